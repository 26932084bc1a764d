"""The weight constraint's basis in the model dtype: its projection error in bf16 vs fp32 at
Llama-2-7B's ``down_proj`` width (d_in 11008), the choice it drives, and the fp32 fallback."""

from __future__ import annotations

import math

import pytest
import torch

from cwac.constraints.basis import StoredSubspace, choose_basis_dtype, projection_error, store_bases
from cwac.constraints.subspace import Subspace

D_IN = 11008   # Llama-2-7B d_ff: down_proj's input side


def _dense_orthonormal(d: int, r: int) -> torch.Tensor:
    """``r`` columns of the orthonormal DCT-II basis of R^d: dense like real eigenvectors, exact,
    and cheap to build at d = 11008 (a QR would take minutes on a CPU)."""
    i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    k = torch.randperm(d, generator=torch.Generator().manual_seed(0))[:r].double().unsqueeze(0)
    U = torch.cos(math.pi * (i + 0.5) * k / d) * math.sqrt(2.0 / d)
    U[:, (k[0] == 0)] = 1.0 / math.sqrt(d)
    return U.float()


@pytest.fixture(scope="module")
def realistic():
    r = 1024   # the stored side has <= d_in/2 columns; the error grows slowly with r (below)
    return Subspace(_dense_orthonormal(D_IN, r), "protected", r)


def test_bf16_basis_error_at_real_width(realistic):
    """At d_in = 11008 a bf16 basis leaves ~3e-3 of a gradient's norm wrong (about the bf16 unit
    roundoff times a small constant), fp16 ~8x less, fp32 ~1e-7: the bf16 error is below
    ``weight.basis_tol`` (1e-2) and well under the 1e-3-1e-1 that AdamW's update puts back into
    U in grad mode."""
    e32 = projection_error(Subspace(realistic.basis, "protected", realistic.rank), torch.float32)
    e_bf16 = projection_error(realistic, torch.bfloat16)
    e_fp16 = projection_error(realistic, torch.float16)
    assert e32 == 0.0
    assert 1e-4 < e_bf16 < 1e-2, e_bf16
    assert e_fp16 < e_bf16 / 4, (e_fp16, e_bf16)
    # the error bounds what the bf16 projection leaves in U
    g = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1))
    low = StoredSubspace(realistic.basis.bfloat16(), "protected", realistic.rank)
    pg = low.project(g.bfloat16()).float()
    assert float((pg @ realistic.basis).norm(dim=1).max() / g.norm(dim=1).min()) <= 1.5 * e_bf16
    print(f"d_in {D_IN}, r {realistic.rank}: projection error bf16 {e_bf16:.2e}, fp16 {e_fp16:.2e}")


def test_choice_model_dtype_in_grad_mode_fp32_otherwise(realistic):
    assert choose_basis_dtype(realistic, torch.bfloat16, "grad", 1e-2)[0] == torch.bfloat16
    assert choose_basis_dtype(realistic, torch.bfloat16, "update", 1e-2)[0] == torch.float32   # exact mode
    assert choose_basis_dtype(realistic, torch.float32, "grad", 1e-2)[0] == torch.float32
    dtype, err = choose_basis_dtype(realistic, torch.bfloat16, "grad", 1e-4)                   # fallback
    assert dtype == torch.float32 and err > 1e-4


def test_store_bases_keeps_shared_sites_shared_and_records_the_choice():
    U = _dense_orthonormal(256, 16)
    shared = Subspace(U, "protected", 16)
    subs = {"layers.0.self_attn.q_proj": shared, "layers.0.self_attn.k_proj": shared,
            "layers.0.mlp.down_proj": Subspace(_dense_orthonormal(512, 8), "protected", 8)}
    out, info = store_bases(subs, torch.bfloat16, "grad", 1e-2)
    assert out["layers.0.self_attn.q_proj"] is out["layers.0.self_attn.k_proj"]
    assert all(s.basis.dtype == torch.bfloat16 for s in out.values())
    assert set(info) == {"layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"}
    # applied in bf16 without an fp32 copy on the side
    g = torch.randn(3, 256).bfloat16()
    out["layers.0.self_attn.q_proj"].project(g)
    assert all(b.dtype == torch.bfloat16 for b in out["layers.0.self_attn.q_proj"]._cache.values())
