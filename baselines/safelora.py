"""SafeLoRA: project fine-tuning updates onto the alignment subspace after training
(Hsu et al., arXiv 2405.16833; reference code ``IBM/SafeLoRA/model.py``).

For every targeted matrix with update Delta W, ``cos = cos(vec(C Delta W), vec(Delta W))`` with the
shared ``C = V V^T / ||V||_F`` (``baselines._weights``). Matrices whose update points away from the
alignment direction are projected:

  * ``select: number``  -> the ``k`` lowest cosines (the reference default, k = 10);
  * ``select: threshold`` -> every matrix with ``cos <= tau`` (tau = 0.5 in the paper).

LoRA: ``B <- C B`` (so Delta W = B A becomes C B A). Full fine-tuning (our port, docs/baselines.md):
``W <- W_aligned + C (W - W_aligned)``, with W_aligned read back from the start checkpoint.

Unlike the reference, all cosines are computed once from the original fine-tuned weights and the
projection is applied once afterwards (``IBM/SafeLoRA#2``: its number mode already projects during
the cosine-gathering pass). Matrices are matched by name, not by parameter order. A matrix whose
update is exactly zero has no cosine and is left alone. Which matrices were projected, and every
cosine, go into the result record.
"""

from __future__ import annotations

import logging

import torch

from baselines._common import adapted_targets, read_tensors
from cwac.modeling import base_weight, is_lora, linear_modules, lora_factors
from baselines._weights import alignment_subspace
from cwac.api import Method

log = logging.getLogger(__name__)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _lora_delta(module) -> torch.Tensor:
    """B A (the alpha/r scaling does not change a cosine, and B <- C B is scale-free)."""
    B, A, _ = lora_factors(module)
    return B.float() @ A.float()


def select_layers(cosines: dict[str, float], mode: str, k: int, tau: float) -> list[str]:
    """Names to project: ``number`` -> the k lowest cosines; ``threshold`` -> cos <= tau."""
    if mode == "number":
        return sorted(cosines, key=lambda n: (cosines[n], n))[: max(0, int(k))]
    if mode == "threshold":
        return sorted(n for n, c in cosines.items() if c <= tau)
    raise ValueError(f"method.select must be 'number' or 'threshold', got {mode!r}")


class SafeLoRA(Method):
    stages = ("finetune",)

    def prepare(self, model) -> None:
        tc = self.ctx.training
        self.lora = bool(tc.lora.enabled)
        self.targets = adapted_targets(self.cfg.targets, tc)
        self.subspace = alignment_subspace(self.ctx, self.targets, self.cfg.normalize)
        self.info: dict = {}

    def _aligned_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        hub_ok = self.ctx.hub_ok
        ws = read_tensors(str(self.ctx.start_model_path), [f"{n}.weight" for n in names], hub_ok)
        return {n: ws[f"{n}.weight"] for n in names}

    @torch.no_grad()
    def post_train(self, model):
        modules = linear_modules(model, self.targets)
        if self.lora:
            not_adapted = [n for n, m in modules.items() if not is_lora(m)]
            if not_adapted:
                raise ValueError(f"SafeLoRA under LoRA projects B, but {not_adapted[:3]} are not LoRA-adapted; "
                                 "set method.targets=auto or a subset of training.lora.target_modules")
            deltas = {n: _lora_delta(m) for n, m in modules.items()}
            aligned = {}
        else:
            aligned = self._aligned_weights(list(modules))
            deltas = {n: base_weight(m).float() - aligned[n].to(base_weight(m).device) for n, m in modules.items()}
        # 1) every cosine from the original fine-tuned weights ...
        cosines = {}
        for n, d in deltas.items():
            if float(d.abs().max()) == 0.0:
                continue
            proj = self.subspace[n].to(d.device)
            cosines[n] = flat_cosine(proj.apply(d), d)
        chosen = select_layers(cosines, self.cfg.select, self.cfg.k, float(self.cfg.tau))
        # 2) ... then one projection
        for n in chosen:
            m = modules[n]
            proj = self.subspace[n].to(base_weight(m).device)
            if self.lora:
                B = lora_factors(m)[0]
                B.copy_(proj.apply(B.float()).to(B.dtype))
            else:
                W = base_weight(m)
                W.copy_((aligned[n].to(W.device) + proj.apply(deltas[n])).to(W.dtype))
        self.info = {"mode": self.cfg.select, "k": int(self.cfg.k), "tau": float(self.cfg.tau),
                     "targets": self.targets, "delta_w": "B A" if self.lora else "W - W_aligned",
                     "normalize": self.cfg.normalize, "n_matrices": len(modules), "n_projected": len(chosen),
                     "projected": chosen, "cosines": {n: round(c, 6) for n, c in cosines.items()}}
        log.info("SafeLoRA projected %d of %d matrices: %s", len(chosen), len(modules), chosen)
        return model

    def record_info(self) -> dict:
        return self.info
