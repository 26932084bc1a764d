"""The alignment direction shared by AsFT and SafeLoRA.

For every targeted weight matrix ``W`` (``d_out x d_in``) of a model aligned from a base model:

    V = W_aligned - W_base,        C = V V^T / ||V||_F          (d_out x d_out)

as in SafeLoRA (Hsu et al., arXiv 2405.16833, ``IBM/SafeLoRA/model.py``) and AsFT (Yang et al.,
arXiv 2506.08473, ``PKU-YuanGroup/AsFT``). Dividing by ``||V||_F`` (not its square) makes C
*not* an idempotent projector: its eigenvalues are ``sigma_i^2 / ||V||_F``, which depend on the
size of the alignment update. We keep that scaling by default (``normalize="fro"``, the
reference) and offer ``normalize="spectral"`` (``C = V V^T / sigma_max^2``: eigenvalues in
[0, 1], the dominant alignment direction is kept exactly). The eigen-range of each C is stored
in the artifact's metadata so a reader can see which regime a model is in.

Storage: a ``C`` matrix costs ``d_out^2``; when ``d_out > d_in`` (e.g. ``gate_proj`` /
``up_proj``) we store the factor ``F = V / sqrt(norm)`` instead (``C = F F^T``), which is
smaller (``d_out d_in``). The set of matrices is an artifact keyed by (base, aligned, targets,
normalisation), computed once (float32) and reused by every cell and both methods; a method
loads it tensor by tensor in the dtype and on the device it asks for (the model's dtype, and
the CPU when it offloads), so that the float32 set never sits in memory whole. Nothing derived
from C (``(I - C)^2``, ``F^T F``) is kept: ``penalty_op`` recomputes what it needs per call,
one matrix at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines._common import checkpoint_folder, read_tensors
from cwac.modeling import LINEAR_TARGETS

log = logging.getLogger(__name__)
FILE = "alignment_subspace.safetensors"
NORMALIZATIONS = ("fro", "spectral")


@dataclass
class Projector:
    """``C`` for one weight matrix, stored densely (``C``) or as a factor (``F``, ``C = F F^T``)."""

    C: torch.Tensor | None = None
    F: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """The stored tensor (``C`` or ``F``)."""
        return self.C if self.C is not None else self.F

    @property
    def d_out(self) -> int:
        return self.tensor.shape[0]

    def to(self, device, dtype=torch.float32, non_blocking: bool = False) -> "Projector":
        t = self.tensor
        if t.device == torch.device(device) and t.dtype == dtype:
            return self
        moved = t.to(device, dtype, non_blocking=non_blocking)
        return Projector(C=moved) if self.C is not None else Projector(F=moved)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``C X``."""
        return self.C @ X if self.C is not None else self.F @ (self.F.T @ X)

    def dense(self) -> torch.Tensor:
        return self.C if self.C is not None else self.F @ self.F.T

    def penalty_op(self, X: torch.Tensor) -> torch.Tensor:
        """``(I - C)^T (I - C) X = (I - C)^2 X`` (C is symmetric), without forming ``(I - C)^2``.

        Dense: ``X - 2 C X + C (C X)``. Factor: ``X + F (K P - 2 P)`` with ``P = F^T X`` and
        ``K = F^T F`` formed for a wide ``X`` (full fine-tuning's Delta W), or ``F^T (F P)`` for a
        thin one (a LoRA factor), whichever is cheaper. Nothing is cached between calls.
        """
        if self.C is not None:
            CX = self.C @ X
            return X - 2 * CX + self.C @ CX
        F = self.F
        P = F.T @ X
        Q = (F.T @ F) @ P if X.shape[1] >= F.shape[1] else F.T @ (F @ P)
        return X + F @ (Q - 2 * P)


def _sigma_max(V: torch.Tensor, exact: bool, iters: int = 50) -> float:
    """Largest singular value: exact (SVD) when it defines the normalisation, else power iteration
    (only reported in the statistics)."""
    if exact:
        return float(torch.linalg.matrix_norm(V.double(), ord=2))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(V.shape[1], 1, generator=g, dtype=V.dtype)
    for _ in range(iters):
        v = V.T @ (V @ v)
        v = v / v.norm().clamp_min(1e-30)
    return float((V @ v).norm())


def build_projector(V: torch.Tensor, normalize: str) -> tuple[Projector, dict]:
    """``C`` from ``V = W_aligned - W_base`` with the given normalisation, plus its statistics."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    V = V.float()
    fro = float(V.double().norm())
    smax = _sigma_max(V, exact=normalize == "spectral") if fro > 0 else 0.0
    denom = fro if normalize == "fro" else smax ** 2
    stats = {"v_fro": fro, "v_sigma_max": smax, "c_eig_max": (smax ** 2 / denom) if denom > 0 else 0.0,
             "shape": list(V.shape)}
    d_out, d_in = V.shape
    if denom == 0:  # the alignment did not touch this matrix: C = 0
        F = torch.zeros(d_out, 1, dtype=torch.float32)
        return Projector(F=F), {**stats, "form": "F"}
    if d_out > d_in:  # the factor is smaller than the dense C
        return Projector(F=V / denom ** 0.5), {**stats, "form": "F"}
    return Projector(C=(V @ V.T) / denom), {**stats, "form": "C"}


class AlignmentSubspace:
    """Canonical module name (``model.layers.0.self_attn.q_proj``) -> ``Projector``."""

    def __init__(self, projectors: dict[str, Projector], stats: dict[str, dict] | None = None,
                 elsewhere: frozenset = frozenset()):
        self.projectors = projectors
        self.stats = stats or {}
        self.elsewhere = elsewhere   # in the artifact, not loaded here (another rank's share)

    def __getitem__(self, name: str) -> Projector:
        try:
            return self.projectors[name]
        except KeyError:
            raise KeyError(f"no alignment direction stored for {name}; the artifact covers "
                           f"{len(self.projectors)} matrices (e.g. {next(iter(self.projectors), None)})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.projectors or name in self.elsewhere

    def names(self) -> list[str]:
        return list(self.projectors)

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
             names=None) -> "AlignmentSubspace":
        """The artifact in ``folder``, read one tensor at a time and converted to ``dtype`` on
        ``device``; only ``names`` when given (the others are listed in ``elsewhere``)."""
        from safetensors import safe_open

        from cwac.artifacts import ArtifactStore

        projs: dict[str, Projector] = {}
        skipped = set()
        with safe_open(str(Path(folder) / FILE), framework="pt") as f:
            for key in f.keys():
                name, form = key.rsplit("::", 1)
                if names is not None and name not in names:
                    skipped.add(name)
                    continue
                t = f.get_tensor(key).to(device, dtype)
                projs[name] = Projector(C=t) if form == "C" else Projector(F=t)
        return cls(projs, ArtifactStore.meta(folder)["meta"].get("stats", {}), frozenset(skipped))


def _checkpoint_names(path: str, hub_ok: bool) -> set[str]:
    import json

    from safetensors import safe_open

    folder = checkpoint_folder(path, hub_ok)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def build_subspace(out: Path, base_path: str, aligned_path: str, targets: list[str], normalize: str,
                   hub_ok: bool) -> dict:
    from safetensors.torch import save_file

    names = sorted(n[: -len(".weight")] for n in _checkpoint_names(aligned_path, hub_ok)
                   if n.endswith(".weight") and ".layers." in n and n[: -len(".weight")].rsplit(".", 1)[-1] in targets)
    if not names:
        raise ValueError(f"checkpoint {aligned_path} has no decoder weights named {targets}")
    tensors, stats = {}, {}
    for n in names:  # one matrix at a time: never two full models in memory
        w = f"{n}.weight"
        a = read_tensors(aligned_path, [w], hub_ok)[w]
        b = read_tensors(base_path, [w], hub_ok)[w]
        if a.shape != b.shape:
            raise ValueError(f"{w}: base {tuple(b.shape)} and aligned {tuple(a.shape)} shapes differ; "
                             "model.base_path must be the pre-alignment version of the same architecture")
        proj, st = build_projector(a - b, normalize)
        tensors[f"{n}::{st['form']}"] = (proj.C if proj.C is not None else proj.F).contiguous()
        stats[n] = st
    save_file(tensors, str(out / FILE))
    eig = [s["c_eig_max"] for s in stats.values()]
    return {"n_matrices": len(names), "normalize": normalize, "targets": targets, "stats": stats,
            "c_eig_max_range": [min(eig), max(eig)]}


def planned_subspace(targets, spec) -> tuple[list[tuple[int, int]], int]:
    """For a memory plan (a ``cwac.memory.PlanSpec``, no model): the (d_out, d_in) of every targeted
    map (``targets`` as ``method.targets``; ``auto`` as ``baselines._common.adapted_targets``) and the
    elements of the stored set over all layers: per map C (d_out^2) or F (d_out x d_in), the smaller."""
    if targets in (None, "auto"):
        names = list(spec.lora_targets) if spec.lora else list(LINEAR_TARGETS)
    else:
        names = [str(t) for t in targets]
    shapes = [spec.shapes.linear(t) for t in names]
    return shapes, spec.shapes.n_layers * sum(o * i if o > i else o * o for o, i in shapes)


def alignment_subspace(ctx, targets: list[str], normalize: str = "fro", dtype: torch.dtype = torch.float32,
                       device="cpu", names=None) -> AlignmentSubspace:
    """The (cached) alignment subspace between ``ctx.base_model_path`` and ``ctx.start_model_path``,
    loaded in ``dtype`` on ``device`` (only ``names`` when given)."""
    if ctx.base_model_path is None:
        raise ValueError("this method needs the pre-alignment base model: set model.base_path (e.g. "
                         "meta-llama/Llama-2-7b-hf for Llama-2-7b-chat), or use model.align=true so that our "
                         "alignment stage provides the un-aligned start model")
    unknown = sorted(set(targets) - set(LINEAR_TARGETS))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; valid: {list(LINEAR_TARGETS)}")
    if ctx.store is None:
        raise ValueError("alignment_subspace needs an ArtifactStore in the TrainContext")
    hub_ok = ctx.hub_ok
    key = {"base": str(ctx.base_model_path), "aligned": str(ctx.start_model_path), "targets": sorted(targets),
           "normalize": normalize, "version": 2}   # 2: factor form whenever d_out > d_in
    folder = ctx.store.get_or_build(
        "alignment_subspace", key,
        lambda out: build_subspace(out, str(ctx.base_model_path), str(ctx.start_model_path), sorted(targets),
                                   normalize, hub_ok))
    return AlignmentSubspace.load(folder, dtype, device, names)
