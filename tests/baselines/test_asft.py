"""AsFT and the shared alignment subspace: C from (base, aligned), the penalty's value and gradient,
zero inside the alignment subspace and positive outside it, full FT and LoRA."""

from __future__ import annotations

import pytest
import torch

from cwac.modeling import lora_factors
from baselines._weights import AlignmentSubspace, build_projector
from baselines.asft import residual_penalty
from tests.baselines.conftest import Q0, V0, make_ctx, make_method, prepared_on_weight_pair


@pytest.mark.parametrize("shape", [(12, 5), (6, 8)])  # factor form (d_out > 2 d_in) and dense form
@pytest.mark.parametrize("normalize", ["fro", "spectral"])
def test_penalty_value_and_gradient_match_the_explicit_formula(shape, normalize):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(*shape, generator=g)
    proj, st = build_projector(V, normalize)
    assert st["form"] == ("F" if shape[0] > 2 * shape[1] else "C")
    denom = V.norm() if normalize == "fro" else torch.linalg.matrix_norm(V, ord=2) ** 2
    C = V @ V.T / denom
    torch.testing.assert_close(proj.dense(), C, rtol=1e-5, atol=1e-6)
    if normalize == "spectral":
        assert abs(float(torch.linalg.eigvalsh(C).max()) - 1.0) < 1e-5
    dW = torch.randn(*shape, generator=g, requires_grad=True)
    ref = ((torch.eye(shape[0]) - C) @ dW).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, dW)
    got = residual_penalty(dW, proj)
    (g_got,) = torch.autograd.grad(got, dW)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def _asft(tiny_model, weight_pair, tmp_path, *overrides, **method_cfg):
    return prepared_on_weight_pair("asft", tiny_model, weight_pair, tmp_path, *overrides, **method_cfg)


def test_subspace_artifact_holds_C_from_base_and_aligned(tiny_model, weight_pair, tmp_path):
    m, model, u, Vv = _asft(tiny_model, weight_pair, tmp_path)
    assert set(m.subspace.names()) == set(m.modules) and len(m.modules) == 14  # 7 maps x 2 layers
    torch.testing.assert_close(m.subspace[Q0].dense(), torch.outer(u, u), rtol=1e-5, atol=1e-6)  # ||V||_F = 1
    torch.testing.assert_close(m.subspace[V0].dense(), Vv @ Vv.T / Vv.norm(), rtol=1e-4, atol=1e-6)
    assert float(m.subspace["model.layers.1.mlp.up_proj"].dense().abs().max()) == 0.0  # untouched: C = 0
    # a second method instance reuses the artifact (same folder, not rebuilt)
    folder = next((tmp_path / "art" / "alignment_subspace").glob("*/artifact.json")).parent
    stamp = (folder / "artifact.json").read_text()
    m2, *_ = _asft(tiny_model, weight_pair, tmp_path)
    assert (folder / "artifact.json").read_text() == stamp and len(list(folder.parent.glob("*/artifact.json"))) == 1
    assert AlignmentSubspace.load(folder).stats[Q0]["v_fro"] == pytest.approx(1.0, rel=1e-5)


def test_full_ft_regulariser_is_zero_inside_the_subspace_and_positive_outside(tiny_model, weight_pair, tmp_path):
    m, model, u, _ = _asft(tiny_model, weight_pair, tmp_path)
    assert _pen(m) == 0.0  # no update yet
    q = model.get_submodule(Q0).weight
    w0 = q.detach().clone()
    x = torch.randn(q.shape[1])
    with torch.no_grad():
        q.copy_(w0 + 0.3 * torch.outer(u, x))  # update along the alignment direction
    inside = _pen(m)
    w = torch.randn(q.shape[0])
    w -= (w @ u) * u  # orthogonal to u
    with torch.no_grad():
        q.copy_(w0 + 0.3 * torch.outer(w, x))
    outside = _pen(m)
    expected = float((0.3 * torch.outer(w, x)).pow(2).sum())  # (I - u u^T) w = w
    scale = float((0.3 * torch.outer(u, x)).pow(2).sum())  # what the same update would cost with C = 0
    assert inside < 1e-6 * scale and outside == pytest.approx(expected, rel=1e-4) and outside > 1e-3
    out = m.compute_loss(model, _batch(tiny_model), 0)
    assert set(out.losses) == {"task", "asft"} and float(out.losses["asft"].detach()) == pytest.approx(outside, rel=1e-4)


def test_spectral_normalisation_keeps_the_dominant_direction_free(tiny_model, weight_pair, tmp_path):
    m, model, _, Vv = _asft(tiny_model, weight_pair, tmp_path, normalize="spectral")
    top = torch.linalg.svd(Vv.double())[0][:, 0].float()
    v = model.get_submodule(V0).weight
    with torch.no_grad():
        v += torch.outer(top, torch.randn(v.shape[1]))
    assert _pen(m) < 1e-6 * float(v.shape[1])


def test_lora_regulariser_uses_B_A(tiny_model, weight_pair, tmp_path):
    m, model, u, _ = _asft(tiny_model, weight_pair, tmp_path, "training=lora")
    assert m.targets == ["q_proj", "v_proj"] and len(m.modules) == 4
    peft_q = m.modules[Q0]
    B, A, _ = lora_factors(peft_q)
    with torch.no_grad():
        B.zero_()
        B[:, 0] = u  # B A = u A[0]: inside the subspace
    assert _pen(m) < 1e-6 * float((B @ A).detach().pow(2).sum())
    with torch.no_grad():
        B[:, 0] = torch.randn(B.shape[0])
    assert _pen(m) == pytest.approx(float(((torch.eye(len(u)) - torch.outer(u, u)) @ (B @ A).detach()).pow(2).sum()), rel=1e-4)
    grads = torch.autograd.grad(m.penalty(), [B, A])
    assert all(float(g.abs().max()) > 0 for g in grads)  # the penalty trains the adapter


def test_missing_base_model_is_a_clear_error(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    m = make_method("asft", make_ctx(cfg, tok, fmt, tmp_path, start="x", base=None))
    with pytest.raises(ValueError, match="model.base_path"):
        m.prepare(tiny_model[0])


def _pen(m) -> float:
    return float(m.penalty().detach())


def _batch(tiny_model):
    from cwac.data.prompts import collate_train, pad_id
    from tests.baselines.conftest import features

    _, tok, fmt, _ = tiny_model
    return collate_train(features(fmt, 4), pad_id(tok))
