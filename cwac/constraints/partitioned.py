"""CWAC's weight constraint when DeepSpeed ZeRO-3 partitions the constrained weights.

Under ZeRO-3 a parameter outside a forward pass is an empty placeholder: each rank holds one
flat slice of it (``p.ds_tensor``, in the model dtype) and of its fp32 master copy in the
optimizer. The two projection modes of ``cwac.constraints.subspace`` (docs/method.md §3.4) then
run as follows:

* ``grad``: unchanged. The tensor hook receives the *full* gradient of the layer, produced in
  the backward pass while DeepSpeed holds the layer gathered, and projects it before DeepSpeed
  reduce-scatters it into partitions (the projection is linear, so it commutes with the
  reduction). No ``W₀`` is kept (``PartitionedWeightConstraint.attach``).
* ``update``: after each optimizer step, one constrained layer at a time, every rank gathers the
  layer's fp32 master (``safe_get_full_fp32_param``, one all-gather), projects
  ``W₀ + (W − W₀)(I − U_r U_rᵀ)`` and writes its own slice back to both the fp32 master
  (``safe_set_local_fp32_param``) and the model-dtype partition, i.e. gather, project,
  re-partition. Every rank computes the same full layer, so no broadcast is needed. The device
  holds at most one gathered layer at a time.

``W₀`` (update mode only) is kept in the model's dtype: it is the start weights themselves, so
that is exact, and the optimizer's master copy starts from the same values. Under ZeRO-3 it is
kept on the host and moved one layer at a time.
"""

from __future__ import annotations

import torch
from cwac.constraints.subspace import WeightConstraint, effective_delta, lora_A_params, read_full, write_full
from cwac.modeling import is_lora


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a live ZeRO-3 parameter (its optimizer still attached)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor") and getattr(p, "_z3_optimizer", None) is not None


def _partition_rank(p) -> int:
    opt = p._z3_optimizer
    if hasattr(opt, "_get_param_partition_rank"):
        return int(opt._get_param_partition_rank(p))
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@torch.no_grad()
def write_partitioned(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's slice of the full value ``full`` into a ZeRO-3 parameter: its fp32 master
    partition in the optimizer and its model-dtype partition (``p.ds_tensor``), padding left as is."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    flat = full.reshape(-1)
    part = p.ds_tensor.numel()
    start = part * _partition_rank(p)
    n = max(0, min(part, flat.numel() - start))
    master = safe_get_local_fp32_param(p)
    if master is not None:   # a frozen parameter has no master
        local = master.detach().clone().reshape(-1)
        local[:n] = flat[start: start + n].to(local.dtype)
        safe_set_local_fp32_param(p, local)
    p.ds_tensor.data.reshape(-1)[:n].copy_(flat[start: start + n].to(p.ds_tensor.dtype))


class PartitionedWeightConstraint(WeightConstraint):
    """``WeightConstraint`` that also runs under ZeRO-3 and keeps ``W₀`` only in update mode.

    Args:
        subspaces, mode: as ``WeightConstraint``.
        zero_stage: the run's DeepSpeed ZeRO stage; update mode at stage 3 gathers one layer at a
            time (module docstring).
        keep_w0_for_diagnostics: in grad mode, keep a host copy of ``W₀`` (model dtype) for the
            diagnostics that measure ``ΔW`` (``proj_leak``, per-map drift); never on the device.
    """

    def __init__(self, subspaces, mode: str, zero_stage: int = 0, keep_w0_for_diagnostics: bool = False):
        super().__init__(subspaces, mode, 0)   # stage 3 is handled here, not refused
        self.zero_stage = int(zero_stage)
        self.keep_w0_for_diagnostics = bool(keep_w0_for_diagnostics)

    @property
    def w0_device(self) -> str | None:
        """Where ``W₀`` lives: the model's device (update mode, stages 0-2), the host (update mode
        at stage 3; grad mode with diagnostics) or nowhere (grad mode without diagnostics)."""
        if self.mode == "update":
            return "host" if self.zero_stage >= 3 else "device"
        return "host" if self.keep_w0_for_diagnostics else None

    @torch.no_grad()
    def attach(self, model) -> None:
        """Move LoRA ``A`` into the free subspace; record ``W₀`` only where ``w0_device`` says."""
        mods = self.modules(model)
        self.lora = any(is_lora(m) for m in mods.values())
        n_trainable = 0
        where = self.w0_device
        for name, m in mods.items():
            if is_lora(m):
                for a in lora_A_params(m):
                    a.copy_(self.subspaces[name].project(a))
                    n_trainable += a.requires_grad
                continue
            n_trainable += m.weight.requires_grad
            if where is not None:
                w = m.weight.detach().clone()
                self.w0[name] = w.cpu() if where == "host" else w
        if n_trainable == 0:
            super().attach(model)   # raises the same error, naming the fix

    def _w0(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        w0 = self.w0.get(name)
        return None if w0 is None else w0.to(device=like.device, dtype=torch.float32)

    @torch.no_grad()
    def apply_update(self, model) -> dict[str, float]:
        """Exact mode after a step, one layer at a time; under ZeRO-3 gather -> project -> re-partition."""
        leaks = []
        for name, ps in self.constrained_params(model).items():
            sub = self.subspaces[name]
            for p in ps:
                w = read_full(p).float()          # ZeRO-3: one all-gather of this layer's fp32 master
                w0 = self._w0(name, w)
                d = w - w0 if w0 is not None else w   # LoRA A: absolute projection
                proj, leak = sub.project_with_norm(d)
                nd = float(d.norm())
                leaks.append(leak / nd if nd > 0 else 0.0)
                new = w0 + proj if w0 is not None else proj
                if is_partitioned(p):
                    write_partitioned(p, new)
                else:
                    write_full(p, new)
                del w, w0, d, proj, new
        return {"proj_leak_pre": sum(leaks) / len(leaks)} if leaks else {}

    @torch.no_grad()
    def leak(self, model) -> dict[str, float]:
        """``proj_leak`` (``WeightConstraint.leak``) with ``W₀`` moved per layer; 0 entries without ``W₀``."""
        vals = []
        for name, m in self.modules(model).items():
            if not is_lora(m) and name not in self.w0:
                continue
            w0 = None if is_lora(m) else self._w0(name, m.weight)
            d = effective_delta(m, w0)
            nd = float(d.norm())
            if nd > 0:
                vals.append(self.subspaces[name].protected_norm(d) / nd)
        return {"proj_leak": sum(vals) / len(vals)} if vals else {}


class OnDevice(dict):
    """``{name: W₀}`` kept on the host, each value moved to ``device`` (float32) when read, so a
    consumer that walks the maps one at a time holds one on the device at a time."""

    def __init__(self, host: dict[str, torch.Tensor], device):
        super().__init__(host)
        self.device = device

    def __getitem__(self, name):
        return super().__getitem__(name).to(device=self.device, dtype=torch.float32)

    def get(self, name, default=None):
        return self[name] if name in self else default
