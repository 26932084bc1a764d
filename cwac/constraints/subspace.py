"""CWAC's weight constraint: keep ``ΔW X ≈ 0`` on harmful-prompt inputs (docs/method.md §3).

For each constrained linear map ``y = W x`` (PyTorch weight ``W: d_out × d_in``; the paper's
choice is the FFN ``down_proj``) the aligned model's inputs ``x`` over harmful prompts give
``C = Σ_t x_t x_tᵀ / N`` (padding masked, float64). ``eigh(C)`` ranks input directions by how
much harmful-prompt activations use them; the top-energy eigenvectors ``U_r`` are *protected*
and every weight change is kept out of them, ``ΔW ← ΔW (I − U_r U_rᵀ)``, so ``ΔW x ≈ 0`` for
inputs in their span. The selection rule is [inferred] and a config field (``selection``):

* ``energy`` (default, η = ``energy``): the smallest r with ``Σ_{i≤r} λ_i / Σ λ ≥ η``;
* ``threshold``: ``λ_i ≥ τ`` (AlphaEdit's cut on a raw covariance, arXiv 2410.02355);
* ``nullspace``: every direction with ``λ_i > tol · λ_max`` (GuardSpace-style exact null space);
* ``rank``: a fixed r.

Only ``U_r`` (or, when ``r > d_in/2``, the complementary free basis) is stored, never the
``d_in × d_in`` projector (docs/method.md §3.3). Two ways to apply it (docs/method.md §3.4):

* ``grad`` (the paper's reading): a tensor hook ``g ← g − (g U_r) U_rᵀ`` on every constrained
  weight. Tensor hooks fire when the gradient is produced, before DeepSpeed's ZeRO-1/2
  reduction and partitioning, and before gradient clipping; the projection is linear, so it
  commutes with accumulation and data-parallel averaging. AdamW's per-coordinate scaling
  still moves the update out of the free subspace (logged as ``proj_leak``).
* ``update`` (exact): after each optimizer step ``W ← W₀ + (W − W₀)(I − U_r U_rᵀ)``, applied to
  the optimizer's full-precision master copy too when DeepSpeed exposes one (ZeRO-1/2), so
  ``ΔW U_r = 0`` holds exactly. DeepSpeed's ZeRO-0 bf16/fp16 optimizer keeps its fp32 masters
  out of reach and copies them back every step; the model then still trains on
  ``W₀ + (W_master − W₀)Π``, which equals exact update mode as long as the optimizer's update
  does not depend on ``W`` (no weight decay), so ``check_mode`` refuses that case with weight
  decay.

The same construction applies to any of a block's linear maps (``targets``: q, k, v, o,
gate, up, down), each with its own input covariance: a documented extension, because on the
CPU organism even freezing every ``down_proj`` leaves most of the drift (docs/organism.md).
Maps that read the same tensor (q/k/v; gate/up) share one covariance ("site").

LoRA (peft): ``ΔW = s·B A`` and ``ΔW x = s·B (A x)``, so projecting the adapter's *input side*
``A ← A (I − U_r U_rᵀ)`` gives ``ΔW U_r = 0``. ``A`` is projected once before training (its
random init has protected components) and then either its gradient (``grad``) or ``A`` itself
after each step (``update``); ``B`` is free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cwac.constraints.activations import forward_quietly, iter_batches, stop_after
from cwac.modeling import LINEAR_TARGETS, base_linear, decoder_layers, is_lora, layer_index, model_device

log = logging.getLogger(__name__)

SELECTIONS = ("energy", "threshold", "nullspace", "rank")
MODES = ("grad", "update")


# ----------------------------------------------------------------------------- targets

def parse_targets(targets) -> list[str]:
    """``weight.targets``: one module name, a list of names, or ``all`` (every linear map)."""
    if isinstance(targets, str):
        targets = list(LINEAR_TARGETS) if targets == "all" else [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("weight.targets is empty; use [down_proj] (the paper) or 'all'")
    return targets


def resolve_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = []
    for i in layers:
        j = int(i) + n_layers if int(i) < 0 else int(i)
        if not 0 <= j < n_layers:
            raise ValueError(f"weight.layers contains {i}, out of range for {n_layers} decoder layers")
        out.append(j)
    return sorted(set(out))


def find_targets(model: nn.Module, targets: Sequence[str], layers: Sequence[int]) -> dict[str, nn.Module]:
    """``{"layers.<i>.<path>": module}`` for each target name in each selected decoder block.

    Names are canonical (independent of peft / DeepSpeed wrappers), so artifacts computed on a
    plain model apply to a wrapped one.
    """
    blocks = decoder_layers(model)
    found: dict[str, nn.Module] = {}
    for i in layers:
        for t in targets:
            hits = [(n, m) for n, m in blocks[i].named_modules() if n.split(".")[-1] == t]
            if len(hits) != 1:
                raise ValueError(f"decoder layer {i} has {len(hits)} modules named {t!r}; weight.targets must "
                                 f"name linear maps of the block, e.g. {', '.join(LINEAR_TARGETS)}")
            name, mod = hits[0]
            if not isinstance(base_linear(mod), nn.Linear):
                raise ValueError(f"layers.{i}.{name} is a {type(mod).__name__}, not a linear map")
            found[f"layers.{i}.{name}"] = mod
    return found


# ----------------------------------------------------------------------------- covariances

@torch.no_grad()
def shared_inputs(model: nn.Module, modules: dict[str, nn.Module], batch) -> dict[str, str]:
    """``{module: site}``: modules whose forward receives the very same tensor object (q/k/v,
    gate/up in Llama blocks) map to the first of them. One forward on ``batch`` decides; the
    inputs are held until it ends so that no tensor id is reused."""
    site_of: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def make_hook(name):
        def hook(_mod, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, name)
            site_of[name] = seen[id(x)][1]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with stop_after(model, max(layer_index(n) for n in modules)):
            forward_quietly(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = set(modules) - set(site_of)
    if missing:
        raise ValueError(f"modules never called in the forward pass: {sorted(missing)}")
    return site_of


def _device_budget(device: torch.device) -> int:
    """Bytes that covariances may hold at once on ``device``: half of what is free now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except ImportError:  # pragma: no cover - psutil ships with deepspeed
        return 4 << 30


def site_groups(sites: Sequence[str], d_in: dict[str, int], bytes_per: int, max_bytes: int) -> list[list[str]]:
    """Consecutive sites (in layer order) packed into groups whose ``d x d`` accumulators fit in
    ``max_bytes`` together; a site larger than the budget is a group of its own."""
    groups: list[list[str]] = []
    used = 0
    for s in sorted(sites, key=lambda n: (layer_index(n), n)):
        size = d_in[s] ** 2 * bytes_per
        if groups and used + size <= max_bytes:
            groups[-1].append(s)
            used += size
        else:
            groups.append([s])
            used = size
    return groups


@torch.no_grad()
def iter_covariances(model: nn.Module, id_lists: Sequence[Sequence[int]], modules: dict[str, nn.Module], *,
                     batch_size: int, pad: int, skip_tokens: int = 0, dtype: torch.dtype = torch.float64,
                     max_bytes: int | None = None, stats: dict | None = None):
    """Second moments ``C = Σ x xᵀ / N`` of each module's input over the prompts' counted tokens,
    yielded one site at a time as ``(site, C)``.

    Modules that read the same input tensor share a site (``shared_inputs``). To bound memory at
    7-9B (32-42 layers of ``d_ff x d_ff`` float64 accumulators are 31-69 GB), the sites are
    accumulated in groups whose accumulators fit ``max_bytes`` together (default: half of the
    device's free memory), one pass over the prompts per group, each pass stopping after the
    group's deepest layer; a site's accumulator is normalised in place and handed over as soon as
    its group's pass ends, so the caller can decompose it and let it go before the next group
    starts. Every site sees the same batches in the same order, so the result does not depend on
    the grouping. ``dtype`` is the accumulation precision (float64 keeps the small eigenvalues of a
    sum of many rank-one terms). ``stats`` (optional) receives ``site_of``, ``n_tokens`` and
    ``passes``.
    """
    device = model_device(model)
    stats = {} if stats is None else stats
    was_training = model.training
    model.eval()
    try:
        batches = list(iter_batches(id_lists, batch_size, pad, skip_tokens))
        n_tok = sum(int(b.token_mask.sum()) for _, b in batches)
        if n_tok == 0:
            raise ValueError("no calibration tokens were counted (every position masked)")
        site_of = shared_inputs(model, modules, batches[0][1].to(device))
        sites = sorted(set(site_of.values()))
        d_in = {s: base_linear(modules[s]).in_features for s in sites}
        budget = _device_budget(device) if max_bytes is None else int(max_bytes)
        groups = site_groups(sites, d_in, torch.empty((), dtype=dtype).element_size(), budget)
        stats.update(site_of=site_of, n_tokens=n_tok, passes=len(groups))
        for group in groups:
            cov: dict[str, torch.Tensor] = {}
            state: dict = {}

            def make_hook(site):
                def hook(_mod, args):
                    sel = args[0][state["mask"]].to(dtype)
                    if site in cov:
                        cov[site].addmm_(sel.T, sel)
                    else:
                        cov[site] = sel.T @ sel
                return hook

            handles = [modules[s].register_forward_pre_hook(make_hook(s)) for s in group]
            try:
                with stop_after(model, max(layer_index(s) for s in group)):
                    for _, batch in batches:
                        batch = batch.to(device)
                        state["mask"] = batch.token_mask
                        forward_quietly(model, batch)
            finally:
                for h in handles:
                    h.remove()
            for s in group:
                c = cov.pop(s)
                yield s, c.div_(n_tok)
                del c
    finally:
        model.train(was_training)


def input_covariances(model: nn.Module, id_lists: Sequence[Sequence[int]], modules: dict[str, nn.Module], *,
                      batch_size: int, pad: int, skip_tokens: int = 0, dtype: torch.dtype = torch.float64,
                      max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Every site's covariance at once: (covariance per site, site of each module, N). For small
    models and tests; ``build_subspaces`` consumes ``iter_covariances`` one site at a time."""
    stats: dict = {}
    cov = dict(iter_covariances(model, id_lists, modules, batch_size=batch_size, pad=pad, skip_tokens=skip_tokens,
                                dtype=dtype, max_bytes=max_bytes, stats=stats))
    return cov, stats["site_of"], stats["n_tokens"]


def select_rank(evals_desc: torch.Tensor, selection: str, *, energy: float = 0.99, threshold: float = 1e-2,
                null_tol: float = 1e-8, rank: int | None = None) -> int:
    """Number r of protected directions given eigenvalues in descending order (see module doc)."""
    lam = evals_desc.clamp_min(0).double()
    d = lam.numel()
    if selection == "energy":
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"weight.energy must be in (0, 1], got {energy}")
        total = float(lam.sum())
        if total <= 0:
            return 0
        cum = torch.cumsum(lam, 0) / total
        return min(d, int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1)
    if selection == "threshold":
        return int((lam >= threshold).sum())
    if selection == "nullspace":
        return int((lam > null_tol * float(lam[0])).sum()) if d and lam[0] > 0 else 0
    if selection == "rank":
        if rank is None:
            raise ValueError("weight.selection=rank needs weight.rank")
        return max(0, min(d, int(rank)))
    raise ValueError(f"weight.selection must be one of {SELECTIONS}, got {selection!r}")


@dataclass
class Subspace:
    """The protected directions ``U_r`` of one input site, stored compactly.

    ``kind == "protected"``: ``basis = U_r`` (d_in × r). ``kind == "free"``: ``basis`` spans the
    orthogonal complement (d_in × (d_in − r)), used when r > d_in / 2 (docs/method.md §3.3).
    """

    basis: torch.Tensor
    kind: str
    rank: int

    def __post_init__(self):
        self._cache: dict = {}

    @property
    def d_in(self) -> int:
        return self.basis.shape[0]

    def _b(self, like: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = self.basis.to(device=like.device, dtype=dtype)
        return self._cache[key]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``g Π = g − (g U_r) U_rᵀ``, along the last (input) dimension; dtype preserved."""
        if self.rank == 0:
            return g
        B = self._b(g)
        x = g.to(B.dtype)
        out = x - (x @ B) @ B.T if self.kind == "protected" else (x @ B) @ B.T
        return out.to(g.dtype)

    def project_with_norm(self, d: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(``d Π``, ``‖d U_r‖_F``) with one product by the basis (update mode, every step)."""
        if self.rank == 0:
            return d, 0.0
        B = self._b(d)
        x = d.to(B.dtype)
        xb = x @ B
        if self.kind == "protected":
            return (x - xb @ B.T).to(d.dtype), float(xb.norm())
        out = xb @ B.T
        return out.to(d.dtype), float((x - out).norm())

    def protected_norm(self, d: torch.Tensor) -> float:
        """``‖d U_r‖_F``."""
        if self.rank == 0:
            return 0.0
        B = self._b(d)
        x = d.to(B.dtype)
        if self.kind == "protected":
            return float((x @ B).norm())
        return float((x - (x @ B) @ B.T).norm())  # = ‖x U_r U_rᵀ‖ = ‖x U_r‖, without cancellation

    @classmethod
    def from_eigh(cls, evals_desc: torch.Tensor, evecs_desc: torch.Tensor, r: int) -> "Subspace":
        d = evecs_desc.shape[0]
        if r > d / 2:
            return cls(evecs_desc[:, r:].float().contiguous(), "free", r)
        return cls(evecs_desc[:, :r].float().contiguous(), "protected", r)


def eigh_desc(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, largest eigenvalue first."""
    c = (c + c.T) / 2
    evals, evecs = torch.linalg.eigh(c)
    return evals.flip(0), evecs.flip(1)


# ----------------------------------------------------------------------------- artifact

def build_subspaces(out: Path, model, id_lists, modules: dict[str, nn.Module], wcfg, *, batch_size: int, pad: int,
                    skip_tokens: int, max_bytes: int | None = None) -> dict:
    """Artifact builder: covariances -> eigh -> selection, one site at a time (only that site's
    covariance and eigenvectors are alive beside the model); writes ``subspace.safetensors``.
    Bases and eigenvalues move to the CPU as each site finishes."""
    from safetensors.torch import save_file

    dtype = {"float64": torch.float64, "float32": torch.float32}[wcfg.cov_dtype]
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, dict] = {}
    stats: dict = {}
    for site, c in iter_covariances(model, id_lists, modules, batch_size=batch_size, pad=pad,
                                    skip_tokens=skip_tokens, dtype=dtype, max_bytes=max_bytes, stats=stats):
        evals, evecs = eigh_desc(c.double())
        d = c.shape[0]
        del c
        r = select_rank(evals, wcfg.selection, energy=float(wcfg.energy), threshold=float(wcfg.threshold),
                        null_tol=float(wcfg.null_tol), rank=wcfg.rank)
        sub = Subspace.from_eigh(evals, evecs, r)
        del evecs
        tensors[f"basis/{site}"] = sub.basis.cpu()
        evals = evals.cpu()
        tensors[f"evals/{site}"] = evals.float()
        lam = evals.clamp_min(0)
        kept = float(lam[:r].sum() / lam.sum()) if float(lam.sum()) > 0 else 0.0
        sites[site] = {"d_in": d, "rank": r, "kind": sub.kind, "energy_kept": round(kept, 6),
                       "lambda_max": float(evals[0]), "lambda_r": float(evals[r - 1]) if r else None,
                       "trace": float(lam.sum())}
    save_file(tensors, str(out / "subspace.safetensors"))
    ranks = [s["rank"] / s["d_in"] for s in sites.values()]
    return {"n_tokens": stats["n_tokens"], "n_prompts": len(id_lists), "site_of": stats["site_of"], "sites": sites,
            "accumulation_passes": stats["passes"], "mean_rank_fraction": round(sum(ranks) / len(ranks), 4)}


def load_subspaces(path: Path, meta: dict) -> dict[str, Subspace]:
    """``{module name: Subspace}`` from a ``cwac_subspace`` artifact (shared sites share objects)."""
    from safetensors.torch import load_file

    t = load_file(str(Path(path) / "subspace.safetensors"))
    by_site = {s: Subspace(t[f"basis/{s}"], info["kind"], info["rank"]) for s, info in meta["sites"].items()}
    return {name: by_site[site] for name, site in meta["site_of"].items()}


# ----------------------------------------------------------------------------- DeepSpeed-aware weight access

def read_full(p: torch.Tensor) -> torch.Tensor:
    """The full-precision value of ``p``: DeepSpeed's fp32 master copy when it keeps one."""
    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        hp = safe_get_full_fp32_param(p)
        if hp is not None:
            return hp
    return p.data


def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``p`` (and DeepSpeed's master copy, else the next step would overwrite the change)."""
    if hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.float())
    p.data.copy_(value.to(p.dtype))


def lora_A_params(module: nn.Module) -> list[torch.Tensor]:
    return [module.lora_A[a].weight for a in module.active_adapters if a in module.lora_A]


def effective_delta(module: nn.Module, w0: torch.Tensor | None) -> torch.Tensor:
    """``ΔW`` of a target: ``W − W₀`` (full fine-tuning) or ``Σ s·B A`` (peft LoRA)."""
    if is_lora(module):
        deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
        return sum(d.float() for d in deltas) if deltas else torch.zeros_like(module.base_layer.weight, dtype=torch.float32)
    return read_full(module.weight).float() - w0.float()


# ----------------------------------------------------------------------------- runtime

def check_mode(mode: str, zero_stage: int = 0, precision: str = "fp32", weight_decay: float = 0.0) -> None:
    """Refuse projection modes that the training setup would silently undo."""
    if mode not in MODES:
        raise ValueError(f"weight.mode must be one of {MODES}, got {mode!r}")
    if mode != "update":
        return
    if zero_stage == 0 and precision != "fp32" and weight_decay > 0:
        raise ValueError(f"weight.mode=update with training.precision={precision}, zero_stage=0 and weight_decay="
                         f"{weight_decay}: DeepSpeed's ZeRO-0 mixed-precision optimizer keeps fp32 master weights "
                         "that the projection cannot reach, and weight decay on them leaks into the protected "
                         "subspace; use training.zero_stage=1 (its master copy is projected too), "
                         "training.weight_decay=0 or training.precision=fp32")


class WeightConstraint:
    """Applies the projection during training and measures its leak.

    Args:
        subspaces: ``{module name: Subspace}`` (from ``load_subspaces``).
        mode: ``grad`` or ``update``.
        zero_stage: DeepSpeed ZeRO stage of the run (update mode at stage 3:
            ``cwac.constraints.partitioned.PartitionedWeightConstraint``, which CWAC uses).
    """

    def __init__(self, subspaces: dict[str, Subspace], mode: str, zero_stage: int = 0):
        check_mode(mode, zero_stage)
        if mode == "update" and zero_stage >= 3:
            raise ValueError("WeightConstraint's update mode edits whole weights after each step, which ZeRO-3 "
                             "partitions; cwac.constraints.partitioned.PartitionedWeightConstraint gathers them")
        self.subspaces = subspaces
        self.mode = mode
        self.w0: dict[str, torch.Tensor] = {}
        self.lora = False
        self._found: tuple[nn.Module, dict[str, nn.Module]] | None = None

    def modules(self, model) -> dict[str, nn.Module]:
        """The constrained modules of ``model`` (looked up once per model object)."""
        if self._found is None or self._found[0] is not model:
            layers = sorted({layer_index(n) for n in self.subspaces})
            targets = sorted({n.split(".")[-1] for n in self.subspaces})
            found = find_targets(model, targets, layers)
            self._found = (model, {n: found[n] for n in self.subspaces})
        return self._found[1]

    @torch.no_grad()
    def attach(self, model) -> None:
        """Record ``W₀`` (full fine-tuning) and move LoRA ``A`` matrices into the free subspace."""
        mods = self.modules(model)
        self.lora = any(is_lora(m) for m in mods.values())
        n_trainable = 0
        for name, m in mods.items():
            if is_lora(m):
                for a in lora_A_params(m):
                    a.copy_(self.subspaces[name].project(a))
                    n_trainable += a.requires_grad
            else:
                self.w0[name] = m.weight.detach().float().clone()
                n_trainable += m.weight.requires_grad
        if n_trainable == 0:
            raise ValueError("none of the weight-constraint targets is trainable (with LoRA, only adapter-wrapped "
                             "maps train): set method.weight.targets to the LoRA target_modules (e.g. [q_proj,v_proj]) "
                             "or add the targets to training.lora.target_modules")

    def constrained_params(self, model) -> dict[str, list[torch.Tensor]]:
        out = {}
        for name, m in self.modules(model).items():
            ps = lora_A_params(m) if is_lora(m) else [m.weight]
            ps = [p for p in ps if p.requires_grad]
            if ps:
                out[name] = ps
        return out

    def project_inputs(self, model, where: str, zero_stage: int = 0) -> dict[str, str]:
        """Grad mode: compute the projection on the maps' inputs where ``where`` (``weight.project_at``)
        asks for it (``cwac.constraints.input_projection``); returns how each map is projected.
        Under ZeRO-3 or LoRA, and in update mode, the maps keep the gradient hook."""
        from cwac.constraints import input_projection

        if where not in input_projection.PROJECT_AT:
            raise ValueError(f"weight.project_at must be one of {input_projection.PROJECT_AT}, got {where!r}")
        out = {}
        for name, m in self.modules(model).items():
            if self.mode != "grad" or where == "gradient" or zero_stage >= 3 or is_lora(m) \
                    or not isinstance(m, nn.Linear) or not m.weight.requires_grad:
                out[name] = "update" if self.mode == "update" else "gradient"
                continue
            input_projection.install(m, self.subspaces[name], where)
            out[name] = where
        return out

    def release(self, model) -> None:
        """Undo ``project_inputs`` (the maps' own forward again)."""
        from cwac.constraints import input_projection

        for m in self.modules(model).values():
            input_projection.remove(m)

    def grad_hooks(self, model) -> dict:
        if self.mode != "grad":
            return {}
        from cwac.constraints.input_projection import installed

        return {p: self.subspaces[name].project for name, ps in self.constrained_params(model).items()
                if not installed(self.modules(model)[name]) for p in ps}

    @torch.no_grad()
    def apply_update(self, model) -> dict[str, float]:
        """Exact mode: project the accumulated update (LoRA: ``A``) after a step.

        Returns ``proj_leak_pre``: the mean share ``‖ΔW U_r‖/‖ΔW‖`` just before projecting,
        i.e. how much of the update the optimizer had pushed into the protected directions.
        """
        leaks = []
        for name, ps in self.constrained_params(model).items():
            sub = self.subspaces[name]
            for p in ps:
                w = read_full(p).float()
                w0 = self.w0.get(name)
                d = w - w0 if w0 is not None else w  # LoRA A: absolute projection
                proj, leak = sub.project_with_norm(d)
                nd = float(d.norm())
                leaks.append(leak / nd if nd > 0 else 0.0)
                write_full(p, w0 + proj if w0 is not None else proj)
        return {"proj_leak_pre": sum(leaks) / len(leaks)} if leaks else {}

    @torch.no_grad()
    def leak(self, model) -> dict[str, float]:
        """``proj_leak``: mean over targets of ``‖ΔW U_r‖_F / ‖ΔW‖_F`` (≈ 0 in update mode)."""
        vals = []
        for name, m in self.modules(model).items():
            d = effective_delta(m, self.w0.get(name))
            nd = float(d.norm())
            if nd > 0:
                vals.append(self.subspaces[name].protected_norm(d) / nd)
        return {"proj_leak": sum(vals) / len(vals)} if vals else {"proj_leak": 0.0}
