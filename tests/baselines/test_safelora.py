"""SafeLoRA: cosines from the original weights, then one projection; high-cosine matrices untouched,
low-cosine ones projected (B <- C B under LoRA, W <- W_aligned + C dW under full FT)."""

from __future__ import annotations

import pytest
import torch

from cwac.modeling import lora_factors
from baselines.safelora import resolve_k, select_layers
from tests.baselines.conftest import Q0, V0, prepared_on_weight_pair

Q1, V1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def _setup(tiny_model, weight_pair, tmp_path, *overrides, **method_cfg):
    return prepared_on_weight_pair("safelora", tiny_model, weight_pair, tmp_path, *overrides, **method_cfg)


def _lora_updates(model, u):
    """q0: B inside the subspace (cos 1); v0: random (0 < cos < 1); layer 1: C = 0 (cos 0)."""
    from cwac.modeling import linear_modules

    mods = linear_modules(model, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, mod in mods.items():
            B, A, _ = lora_factors(mod)
            B.copy_(torch.randn(B.shape, generator=g))
        B = lora_factors(mods[Q0])[0]
        B.copy_(torch.outer(u, torch.randn(B.shape[1], generator=g)))
    return mods, {n: lora_factors(mod)[0].detach().clone() for n, mod in mods.items()}


def test_threshold_mode_projects_low_cosine_and_keeps_high_cosine(tiny_model, weight_pair, tmp_path):
    m, model, u, Vv = _setup(tiny_model, weight_pair, tmp_path, "training=lora", select="threshold", tau=0.5)
    mods, before = _lora_updates(model, u)
    m.post_train(model)
    cos = m.info["cosines"]
    assert cos[Q0] == pytest.approx(1.0, abs=1e-6) and cos[Q1] == 0.0 and cos[V1] == 0.0
    chosen = set(m.info["projected"])
    assert chosen == {n for n, c in cos.items() if c <= 0.5} and Q0 not in chosen and {Q1, V1} <= chosen
    for n, mod in mods.items():
        B = lora_factors(mod)[0]
        if n in chosen:
            torch.testing.assert_close(B, m.subspace[n].apply(before[n]))
        else:
            assert torch.equal(B, before[n])  # untouched, bit for bit


@pytest.mark.parametrize("k", [3, 0.75], ids=["count", "fraction"])   # 0.75 of the 4 LoRA maps = 3
def test_number_mode_projects_the_k_lowest_cosines_computed_before_any_projection(tiny_model, weight_pair, tmp_path, k):
    m, model, u, _ = _setup(tiny_model, weight_pair, tmp_path, "training=lora", select="number", k=k)
    mods, before = _lora_updates(model, u)
    from baselines.safelora import _lora_delta, flat_cosine

    original = {n: flat_cosine(m.subspace[n].apply(_lora_delta(mod)), _lora_delta(mod)) for n, mod in mods.items()}
    m.post_train(model)
    assert m.info["cosines"] == {n: round(c, 6) for n, c in original.items()}
    assert m.info["projected"] == sorted(original, key=lambda n: (original[n], n))[:3]
    assert Q0 not in m.info["projected"] and torch.equal(lora_factors(mods[Q0])[0], before[Q0])
    assert m.info["k"] == 3 and m.info["k_config"] == k


def test_k_is_a_count_or_a_fraction_and_paper_scale_uses_the_reference_fraction():
    from tests.conftest import compose

    assert resolve_k(10, 224) == 10 and resolve_k(0, 64) == 0               # a count, as given
    assert resolve_k(10 / 64, 64) == 10 and resolve_k(10 / 64, 224) == 35   # the reference's 10 of 64
    assert resolve_k(0.001, 64) == 1
    assert resolve_k(0.25, 10) == 3 and resolve_k(0.25, 14) == 4 and resolve_k(10 / 64, 16) == 3   # half up
    for bad in (-1, 1.5, 0.0, "ten", True):
        with pytest.raises(ValueError, match="method.k="):
            resolve_k(bad, 64)
    assert compose("method=safelora").method.k == 10                        # the CPU default: 10 matrices
    assert compose("method=safelora", "budget=paper").method.k == pytest.approx(10 / 64)


def test_full_ft_port_projects_W_minus_W_aligned(tiny_model, weight_pair, tmp_path):
    m, model, u, Vv = _setup(tiny_model, weight_pair, tmp_path, select="threshold", tau=0.5)
    aligned = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.get_submodule(Q0).weight += torch.outer(u, torch.randn(model.get_submodule(Q0).weight.shape[1], generator=g))
        for n in (V0, Q1):
            model.get_submodule(n).weight += 0.01 * torch.randn(model.get_submodule(n).weight.shape, generator=g)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    m.post_train(model)
    assert set(m.info["cosines"]) == {Q0, V0, Q1}  # unchanged matrices have no cosine
    assert Q0 not in m.info["projected"] and Q1 in m.info["projected"]
    for n in m.info["cosines"]:
        w = model.get_submodule(n).weight
        if n in m.info["projected"]:
            dW = tuned[f"{n}.weight"] - aligned[f"{n}.weight"]
            torch.testing.assert_close(w, aligned[f"{n}.weight"] + m.subspace[n].apply(dW))
        else:
            assert torch.equal(w, tuned[f"{n}.weight"])
    assert torch.equal(model.get_submodule(Q1).weight, aligned[f"{Q1}.weight"])  # C = 0 there: reverted


def test_select_layers_modes():
    cos = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.3}
    assert select_layers(cos, "number", 2, 0.0) == ["b", "d"]
    assert select_layers(cos, "threshold", 0, 0.5) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="number' or 'threshold"):
        select_layers(cos, "top", 1, 0.5)
