"""The weight constraint's basis ``U`` in the model's dtype where that is exact enough.

A basis of one site is ``d_in × r`` (or the free complement, ``d_in × (d_in − r)``; at most
``d_in / 2`` columns), per layer: ~2.9 GB per 32 layers of Llama-2-7B's ``down_proj`` (d_in
11008) in fp32, half of it in bf16. Rounding ``U`` to bf16 (8 significant bits) makes the
projector ``I − Ũ Ũᵀ`` inexact: the projected gradient differs from the exact one by a relative
``ε = ‖g Π̃ − g Π‖ / ‖g‖``, and ``‖(g Π̃) U‖ ≤ ε ‖g‖`` bounds what is left in the protected
directions. ``ε`` is measured per site on random probe rows (``projection_error``).

* ``grad`` mode (the paper's): AdamW's per-coordinate scaling already moves ~1e-3–1e-1 of each
  update back into ``U`` (``proj_leak``), so ``ε`` ≈ 3e-3 in bf16 changes nothing that matters; the
  basis is kept in the model dtype when ``ε ≤ weight.basis_tol``, else in fp32 (the fallback).
* ``update`` mode (exact, ``ΔW U = 0`` to ~1e-6): always fp32.

``tests/cwac/test_basis.py`` measures ``ε`` at Llama-2-7B's width (d_in 11008).
"""

from __future__ import annotations

import torch

from cwac.constraints.subspace import Subspace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoredSubspace(Subspace):
    """A ``Subspace`` whose basis is kept and applied in its own dtype (no fp32 copy is cached)."""

    def _b(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, self.basis.dtype)
        if key not in self._cache:
            self._cache[key] = self.basis.to(device=like.device)
        return self._cache[key]


@torch.no_grad()
def projection_error(sub: Subspace, dtype: torch.dtype, n_probe: int = 16, seed: int = 0) -> float:
    """``max ‖g Π̃ − g Π‖ / ‖g‖`` over ``n_probe`` random rows ``g``, ``Π̃`` with the basis rounded
    to ``dtype`` and applied in it, ``Π`` exact (float64)."""
    if sub.rank == 0 or dtype == torch.float32:
        return 0.0
    g = torch.randn(n_probe, sub.d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = Subspace(sub.basis.double(), sub.kind, sub.rank).project(g)
    low = StoredSubspace(sub.basis.to(dtype), sub.kind, sub.rank).project(g.to(dtype)).double()
    return float(((low - exact).norm(dim=1) / g.norm(dim=1)).max())


def choose_basis_dtype(sub: Subspace, model_dtype: torch.dtype, mode: str, tol: float) -> tuple[torch.dtype, float]:
    """(dtype to keep ``sub``'s basis in, its measured ``ε``): the model dtype in grad mode when
    ``ε ≤ tol``, else float32 (update mode always)."""
    if mode == "update" or model_dtype == torch.float32:
        return torch.float32, 0.0
    err = projection_error(sub, model_dtype)
    return (model_dtype, err) if err <= tol else (torch.float32, err)


def store_bases(subspaces: dict[str, Subspace], model_dtype: torch.dtype, mode: str, tol: float) -> tuple[dict, dict]:
    """``{name: StoredSubspace}`` with each site's basis in the dtype ``choose_basis_dtype`` picks
    (maps sharing a site share the object), and ``{site id: (dtype name, ε)}`` for the record."""
    out, chosen, info = {}, {}, {}
    for name, sub in subspaces.items():
        if id(sub) not in chosen:
            dtype, err = choose_basis_dtype(sub, model_dtype, mode, tol)
            chosen[id(sub)] = StoredSubspace(sub.basis.to(dtype).contiguous(), sub.kind, sub.rank)
            info[name] = {"dtype": str(dtype).removeprefix("torch."), "projection_error": err}
        out[name] = chosen[id(sub)]
    return out, info
