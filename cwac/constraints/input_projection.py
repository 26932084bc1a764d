"""CWAC's gradient projection computed on the layer's inputs when that is cheaper (grad mode).

Grad mode replaces the gradient ``G = δᵀ X`` of a constrained map ``y = X Wᵀ`` (``X``: ``T × d_in``
inputs of one call, ``δ``: ``T × d_out`` output gradients) by ``G Π``, ``Π = I − U_r U_rᵀ``
(docs/method.md §3.4). Since ``G Π = δᵀ (X Π)``, the same product can be formed from the
projected inputs. The two forms cost, in multiply-adds with the stored basis ``B`` (``d_in × c``,
``c = min(r, d_in − r)``, ``cwac.constraints.subspace.Subspace``):

* gradient side, ``G − (G B) Bᵀ`` (the tensor hook of ``WeightConstraint.grad_hooks``): ``2 d_out d_in c``
  once per backward;
* input side, ``X − (X B) Bᵀ`` before the weight-gradient product: ``2 T d_in c`` per call.

So the input side is cheaper when a call has fewer tokens than the map has outputs, ``T < d_out``:
always on the organism's ``down_proj`` (``d_out`` 576; 300-400 task tokens and ~180 regulariser
tokens a step), and by 8-30x at the paper's scale (Llama-2-7B's ``down_proj``: ``d_out`` 4096 at
batch 1 with rows of 100-500 tokens), where the gradient-side projection alone costs more
multiply-adds than the whole SFT step (docs/scale.md). ``weight.project_at``: ``gradient`` (the
hook), ``input``, or ``auto`` (per call, the cheaper by the count above). The result is the same up
to float rounding (``tests/cwac/test_input_projection.py``).

The map's forward is replaced by one autograd function (``ProjectedLinear``) whose backward
returns the input gradient ``δ W`` unchanged and the projected weight gradient. It needs the whole
weight in the backward, so it is used for full fine-tuning at ZeRO stages 0-2; under ZeRO-3 or
LoRA the constraint keeps the gradient hook (``WeightConstraint.grad_hooks``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

PROJECT_AT = ("gradient", "input", "auto")


class ProjectedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient is ``δᵀ x`` projected by ``sub``."""

    @staticmethod
    def forward(ctx, x, weight, bias, sub, where):
        ctx.save_for_backward(x, weight)
        ctx.sub, ctx.where, ctx.has_bias = sub, where, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = gy @ weight
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            if input_side(ctx.where, x2.shape[0], weight.shape[0]):
                gw = g2.T @ ctx.sub.project(x2)
            else:
                gw = ctx.sub.project(g2.T @ x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def input_side(where: str, tokens: int, d_out: int) -> bool:
    """Whether a call of ``tokens`` rows projects its inputs (else the gradient)."""
    return where == "input" or (where == "auto" and tokens < d_out)


def _forward(self, x):
    if not torch.is_grad_enabled() or not self.weight.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return ProjectedLinear.apply(x, self.weight, self.bias, self._cwac_subspace, self._cwac_project_at)


def install(module: nn.Linear, sub, where: str) -> None:
    """Route ``module``'s forward through ``ProjectedLinear`` (undone by ``remove``)."""
    if where not in PROJECT_AT or where == "gradient":
        raise ValueError(f"install needs weight.project_at in ('input', 'auto'), got {where!r}")
    module._cwac_subspace, module._cwac_project_at = sub, where
    module.forward = types.MethodType(_forward, module)


def remove(module: nn.Module) -> None:
    """Restore the module's class forward."""
    if "forward" in module.__dict__:
        del module.forward
    for attr in ("_cwac_subspace", "_cwac_project_at"):
        module.__dict__.pop(attr, None)


def installed(module: nn.Module) -> bool:
    return "_cwac_subspace" in module.__dict__
