"""AsFT: Anchoring Safety during LLM Fine-Tuning within a narrow safety basin
(Yang et al., arXiv 2506.08473; reference code ``PKU-YuanGroup/AsFT``).

Loss = task + lambda * sum_l ||(I - C_l) Delta W_l||_F^2, with ``C_l = V_l V_l^T / ||V_l||_F`` and
``V_l = W_aligned - W_base`` (``baselines._weights``). The penalty suppresses the part of each
update that leaves the alignment direction (docs/baselines.md, "AsFT").

Delta W:
  * LoRA: ``Delta W = B A``; the alpha/r scaling is left out like the reference
    (``lora_scaling: true`` includes it).
  * full fine-tuning: ``Delta W = W - W_aligned`` against a frozen copy of the targeted matrices
    taken before training. (The reference silently turns the regulariser off without LoRA.)

Targets (``targets: auto``): the LoRA-adapted matrices under LoRA (the reference), every decoder
linear map (q, k, v, o, gate, up, down) under full fine-tuning, since all of them are trained.

Gradient, not loss: the penalty's gradient ``2 lambda (I - C)^2 Delta W`` is added to each
targeted weight's gradient by a gradient hook (``Method.grad_hooks``), one matrix at a time,
in float32, freed before the next; nothing is saved for the backward and nothing is kept across
steps. (As a loss term, autograd would keep ``(I - C)^2 Delta W`` and a float32 Delta W for every
matrix until the backward: tens of GB at 7B.) Under LoRA the same gradient is applied to the
factors: ``2 s^2 (I - C)^2 B (A A^T)`` to B and ``2 s^2 B^T (I - C)^2 B A`` to A
(``s``: the alpha/r scaling when ``lora_scaling``, else 1). The penalty's value
``<Delta W, (I - C)^2 Delta W>`` falls out of the same products and is logged by ``after_step``
(``metrics/asft`` = lambda x penalty, ``metrics/asft_penalty_raw``), so the logged
``losses/total`` is the task loss.

Memory: C or F (``baselines._weights``: the factor whenever it is smaller) and, under full
fine-tuning, the anchor W_aligned are kept in the dtype the model trains in (bf16 at paper
scale, float32 on the CPU), on the training device, or on the CPU with ``offload: true``
(moved per matrix inside the hook). Under ZeRO-3 the hook sees the full gradient before
DeepSpeed partitions it and the module's gathered weights, so it needs no collective; the
anchors are taken from gathered weights before training. With several ranks at ZeRO-3 (full
fine-tuning) every matrix belongs to one rank (``baselines._common.owners``), which alone holds
its C / F and anchor and adds ``world x`` its gradient (DeepSpeed averages over the ranks): each
rank holds and computes about 1 / world of the penalty, and the logged value is summed over ranks.

Gradient accumulation: the hook adds the penalty's gradient on the first micro-batch of each
optimizer step only (the micro-batch that ``compute_loss`` sees first at a new step arms the
hooks), so one optimizer step gets exactly one ``lambda * penalty`` gradient whatever the
accumulation, as when the penalty was a loss term divided by the accumulation steps with the
task loss (the reference adds it undivided per micro-batch, i.e. ``acc`` times). The hook adds
an unscaled gradient, so fp16 (whose loss scaling it would bypass) is refused.
"""

from __future__ import annotations

import torch

from baselines._common import (adapted_targets, full_in_hook, gathered, numel, owners, rank_world, refuse_fp16,
                               sum_over_ranks, train_dtype)
from baselines._weights import NORMALIZATIONS, alignment_subspace, planned_subspace
from cwac.api import LossOutput, Method
from cwac.modeling import LINEAR_TARGETS, base_weight, is_lora, linear_modules, lora_factors
from cwac.schema import ConfigError


def check_subspace_settings(node, cfg, key: str) -> None:
    """What AsFT and SafeLoRA need of the config for their alignment subspace V = W_aligned - W_base:
    a pre-alignment base model, known target maps and a known normalisation."""
    if not cfg.model.align and not cfg.model.base_path:
        raise ConfigError(f"config model.base_path=null (and model.align=false) but {key}={node.name} needs the pre-alignment base model: set "
                          f"model.base_path (e.g. meta-llama/Llama-2-7b-hf for Llama-2-7b-chat), or use "
                          f"model.align=true so that our alignment stage provides the un-aligned start model")
    try:
        targets = adapted_targets(node.targets, cfg.training)
    except ValueError as e:
        raise ConfigError(f"config {key}.targets: {e}") from None
    unknown = sorted(set(targets) - set(LINEAR_TARGETS))
    if unknown or not targets:
        raise ConfigError(f"config {key}.targets={targets} is not valid: unknown maps {unknown}; use auto or a "
                          f"non-empty list of {list(LINEAR_TARGETS)}")
    if node.normalize not in NORMALIZATIONS:
        raise ConfigError(f"config {key}.normalize={node.normalize!r} is not valid; valid values: "
                          f"{', '.join(NORMALIZATIONS)}")


class AsFT(Method):
    stages = ("finetune",)

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        try:
            refuse_fp16(cfg.training, "asft")
        except ValueError as e:
            raise ConfigError(f"config {e}") from None
        check_subspace_settings(node, cfg, key)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self._step: int | None = None   # the optimizer step whose first micro-batch armed the hooks
        self._pending: set = set()      # hook keys that still owe this step's penalty gradient
        self._terms: list[torch.Tensor] = []   # this step's per-matrix penalty values

    def prepare(self, model) -> None:
        from cwac.trainer import train_device

        tc = self.ctx.training
        self.lora = bool(tc.lora.enabled)
        self.targets = adapted_targets(self.cfg.targets, tc)
        self.lam = float(self.cfg.lam)
        self.offload = bool(self.cfg.offload)
        self.modules = linear_modules(model, self.targets)
        ref = base_weight(next(iter(self.modules.values())))
        self.dtype = train_dtype(tc, ref)
        self.ref_device = torch.device("cpu") if self.offload else train_device()
        rank, self.world = rank_world()
        self.sharded = self.world > 1 and int(tc.zero_stage) >= 3 and not self.lora
        own = owners({n: numel(base_weight(m)) for n, m in self.modules.items()}, self.world) if self.sharded else {}
        self.mine = {n for n in self.modules if not self.sharded or own[n] == rank}
        self.subspace = alignment_subspace(self.ctx, self.targets, self.cfg.normalize, self.dtype, self.ref_device,
                                           names=self.mine)
        missing = [n for n in self.modules if n not in self.subspace]
        if missing:
            raise ValueError(f"no alignment direction for {missing[:3]}...: the subspace artifact and the model disagree")
        self.anchor: dict[str, torch.Tensor] = {}
        if self.lora:
            not_adapted = [n for n, m in self.modules.items() if not is_lora(m)]
            if not_adapted:
                raise ValueError(f"AsFT under LoRA penalises B A, but {not_adapted[:3]} are not LoRA-adapted; "
                                 "set method.targets=auto or to a subset of training.lora.target_modules")
            self.keys = [(n, f) for n in self.modules for f in ("B", "A")]
            self.lora_scale = {n: lora_factors(m)[2] if self.cfg.lora_scaling else 1.0 for n, m in self.modules.items()}
        else:  # frozen copy of the aligned weights of the targeted matrices, one matrix at a time
            for n, m in self.modules.items():
                W = base_weight(m)
                with gathered([W]):   # collective: every rank, every matrix; the owner keeps it
                    if n in self.mine:
                        self.anchor[n] = W.detach().to(self.ref_device, self.dtype, copy=True)
            self.keys = list(self.modules)

    # ---- the penalty, one matrix at a time ----------------------------------------------------
    def _proj(self, name: str, device):
        return self.subspace[name].to(device, torch.float32, non_blocking=True)

    def _full_grad(self, name: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``(I - C)^2 Delta W``, ``||(I - C) Delta W||^2``) for ``Delta W = W - W_aligned`` (float32)."""
        dw = W.detach().float() - self.anchor[name].to(W.device, torch.float32, non_blocking=True)
        G = self._proj(name, W.device).penalty_op(dw)
        return G, (dw * G).sum()

    def _lora_parts(self, name: str, B: torch.Tensor, A: torch.Tensor):
        """(``(I - C)^2 B``, ``A A^T``, ``s^2``) in float32: the pieces of both factors' gradients."""
        s = self.lora_scale[name]
        Bf, Af = B.detach().float(), A.detach().float()
        return self._proj(name, B.device).penalty_op(Bf), Af @ Af.T, s * s

    def _hook(self, key, params: list[torch.Tensor]):
        lam = self.lam

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if key not in self._pending:      # a later micro-batch of the same step
                return grad
            self._pending.discard(key)
            if self.sharded:   # full fine-tuning only: the owner adds world x, the others nothing
                if key not in self.mine:
                    return grad
                W = params[0]
                if W.ds_status.name != "AVAILABLE":
                    raise RuntimeError(f"AsFT: {key}'s weight is not gathered in its gradient hook under ZeRO-3; "
                                       "set method.targets to fewer maps or train at training.zero_stage=2")
                with torch.no_grad():
                    G, pen = self._full_grad(key, W)
                self._terms.append(pen)
                return grad + (2 * lam * self.world * G).to(grad.dtype)
            with torch.no_grad(), full_in_hook(params):
                if not self.lora:
                    G, pen = self._full_grad(key, params[0])
                    self._terms.append(pen)
                    return grad + (2 * lam * G).to(grad.dtype)
                name, which = key
                B, A = params
                MB, AAt, s2 = self._lora_parts(name, B, A)
                if which == "B":
                    self._terms.append(s2 * ((B.detach().float().T @ MB) * AAt).sum())
                    return grad + (2 * lam * s2 * (MB @ AAt)).to(grad.dtype)
                return grad + (2 * lam * s2 * ((B.detach().float().T @ MB) @ A.detach().float())).to(grad.dtype)

        return hook

    def grad_hooks(self, model) -> dict:
        mods = linear_modules(model, self.targets)
        hooks = {}
        for n, m in mods.items():
            if self.lora:
                B, A, _ = lora_factors(m)
                hooks[B] = self._hook((n, "B"), [B, A])
                hooks[A] = self._hook((n, "A"), [B, A])
            else:
                W = base_weight(m)
                hooks[W] = self._hook(n, [W])
        return hooks

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """sum_l ||(I - C_l) Delta W_l||_F^2 over the targeted matrices (a value, float32; the
        training gradient comes from the hooks)."""
        terms = []
        for n, m in self.modules.items():
            if self.lora:
                B, A, _ = lora_factors(m)
                with gathered([B, A]):
                    dw = (B.float() @ A.float()) * self.lora_scale[n]
                    terms.append((dw * self._proj(n, dw.device).penalty_op(dw)).sum().cpu())
            else:
                W = base_weight(m)
                with gathered([W]):   # collective: every rank, every matrix
                    if n in self.mine:
                        terms.append(self._full_grad(n, W)[1].cpu())
        local = torch.stack(terms).sum() if terms else torch.zeros(())
        return torch.tensor(sum_over_ranks(local)) if self.sharded else local

    # ---- the loop's hooks -------------------------------------------------------------------
    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if step != self._step:   # the first micro-batch of an optimizer step arms every hook once
            self._step, self._pending, self._terms = step, set(self.keys), []
        return LossOutput({"task": self.task_loss(model, batch)})

    def after_step(self, model, step: int) -> dict[str, float]:
        self._step = None
        terms, self._terms = self._terms, []
        local = torch.stack([t.detach().double().cpu() for t in terms]).sum() if terms else torch.zeros((), dtype=torch.float64)
        if self.sharded:   # collective: every rank reaches after_step at every step
            pen = sum_over_ranks(local)
        elif not terms:
            return {}
        else:
            pen = float(local)
        return {"asft": self.lam * pen, "asft_penalty_raw": pen}

    def record_info(self) -> dict:
        eig = [s["c_eig_max"] for s in self.subspace.stats.values()]
        return {"targets": self.targets, "n_matrices": len(self.modules), "lam": self.lam,
                "normalize": self.cfg.normalize, "delta_w": "B A" if self.lora else "W - W_aligned",
                "lora_scaling": bool(self.cfg.lora_scaling), "penalty": "gradient hook",
                "reference_dtype": str(self.dtype).replace("torch.", ""), "offload": self.offload,
                "sharded_over_ranks": self.world if self.sharded else 1, "n_matrices_held": len(self.mine),
                "c_eig_max_range": [min(eig), max(eig)] if eig else None}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """AsFT's own tensors (docs/scale.md): per map C (d_out^2) or its factor F (d_out x d_in,
        whichever is smaller) and, under full fine-tuning, the anchor W_aligned, in the model dtype,
        on the device or on the CPU (``offload``), each rank holding its share under ZeRO-3 (full
        fine-tuning; under LoRA every rank holds every C / F); the hook's float32 work on one map at
        a time."""
        from cwac.memory import key

        s, b = spec.shapes, spec.dtype_bytes
        shapes, ref = planned_subspace(cfg.targets, spec)
        host = bool(cfg.offload)
        # shared out over the ranks under ZeRO-3 with full fine-tuning only (``prepare``: LoRA keeps all on every rank)
        out = {key("reference C / F (model dtype)", host=host): ref * b if spec.lora else spec.sharded(ref * b)}
        o, i = max(shapes, key=lambda oi: oi[0] * oi[1])
        work = 5 * o * i * 4 + (o * i if o > i else o * o) * 4
        if not spec.lora:
            out[key("anchor W_aligned (model dtype)", host=host)] = spec.sharded(s.n_layers * sum(o * i for o, i in shapes) * b)
        out[key("gradient hook: one map's fp32 Delta W, reference and (I - C)^2 Delta W")] = work
        return out
