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

Gradient accumulation: the penalty is returned whole on every micro-batch; the engine divides
each micro-batch loss by the accumulation steps, so one optimizer step sees exactly one
``lambda * penalty`` gradient whatever the accumulation (the reference adds it undivided per
micro-batch, i.e. ``acc`` times). The gradient ``2 (I - C)^2 Delta W`` needs one matrix product
per matrix (a custom autograd function), not two.
"""

from __future__ import annotations

import torch

from baselines._common import adapted_targets
from cwac.modeling import base_weight, is_lora, linear_modules, lora_factors
from baselines._weights import Projector, alignment_subspace
from cwac.api import LossOutput, Method


class _QuadraticPenalty(torch.autograd.Function):
    """``<X, (I - C)^2 X> = ||(I - C) X||_F^2`` with gradient ``2 (I - C)^2 X``."""

    @staticmethod
    def forward(ctx, X, proj: Projector):
        G = proj.penalty_op(X)
        ctx.save_for_backward(G)
        return (X * G).sum()

    @staticmethod
    def backward(ctx, grad_out):
        (G,) = ctx.saved_tensors
        return 2 * grad_out * G, None


def residual_penalty(delta_w: torch.Tensor, proj: Projector) -> torch.Tensor:
    """``||(I - C) Delta W||_F^2`` (float32; ``proj`` must be on ``delta_w``'s device)."""
    return _QuadraticPenalty.apply(delta_w.float(), proj)


class AsFT(Method):
    stages = ("finetune",)

    def prepare(self, model) -> None:
        tc = self.ctx.training
        self.lora = bool(tc.lora.enabled)
        self.targets = adapted_targets(self.cfg.targets, tc)
        self.lam = float(self.cfg.lam)
        self.subspace = alignment_subspace(self.ctx, self.targets, self.cfg.normalize)
        self.modules = linear_modules(model, self.targets)
        missing = [n for n in self.modules if n not in self.subspace]
        if missing:
            raise ValueError(f"no alignment direction for {missing[:3]}...: the subspace artifact and the model disagree")
        if self.lora:
            not_adapted = [n for n, m in self.modules.items() if not is_lora(m)]
            if not_adapted:
                raise ValueError(f"AsFT under LoRA penalises B A, but {not_adapted[:3]} are not LoRA-adapted; "
                                 "set method.targets=auto or to a subset of training.lora.target_modules")
            self.anchor = {}
        else:  # frozen copy of the aligned weights of the targeted matrices
            self.anchor = {n: base_weight(m).detach().clone() for n, m in self.modules.items()}

    def delta(self, name: str) -> torch.Tensor:
        m = self.modules[name]
        if self.lora:
            B, A, scaling = lora_factors(m)
            return (B @ A) * (scaling if self.cfg.lora_scaling else 1.0)
        return base_weight(m) - self.anchor[name]

    def penalty(self) -> torch.Tensor:
        """sum_l ||(I - C_l) Delta W_l||_F^2 over the targeted matrices."""
        terms = []
        for n in self.modules:
            dw = self.delta(n)
            proj = self.subspace[n]
            if (proj.C if proj.C is not None else proj.F).device != dw.device:  # move once, keep the cache
                proj = self.subspace.projectors[n] = proj.to(dw.device)
            terms.append(residual_penalty(dw, proj))
        return torch.stack(terms).sum()

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        task = self.task_loss(model, batch)
        pen = self.penalty()
        return LossOutput({"task": task, "asft": self.lam * pen}, {"asft_penalty_raw": float(pen.detach())})

    def record_info(self) -> dict:
        eig = [s["c_eig_max"] for s in self.subspace.stats.values()]
        return {"targets": self.targets, "n_matrices": len(self.modules), "lam": self.lam,
                "normalize": self.cfg.normalize, "delta_w": "B A" if self.lora else "W - W_aligned",
                "lora_scaling": bool(self.cfg.lora_scaling),
                "c_eig_max_range": [min(eig), max(eig)] if eig else None}
