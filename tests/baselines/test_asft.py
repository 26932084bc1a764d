"""AsFT and the shared alignment subspace: C from (base, aligned), the penalty's value and gradient,
zero inside the alignment subspace and positive outside it, full FT and LoRA; the gradient hooks
give the gradient of the penalty as a loss term (the former autograd form), once per step."""

from __future__ import annotations

import pytest
import torch

from cwac.modeling import base_weight, lora_factors
from baselines._weights import AlignmentSubspace, build_projector
from tests.baselines.conftest import Q0, V0, make_ctx, make_method, prepared_on_weight_pair


@pytest.mark.parametrize("shape", [(12, 5), (7, 5), (6, 8)])  # factor form (d_out > d_in) and dense form
@pytest.mark.parametrize("normalize", ["fro", "spectral"])
@pytest.mark.parametrize("n_cols", [None, 2])   # a wide Delta W (full FT) and a thin one (a LoRA factor)
def test_penalty_value_and_gradient_match_the_explicit_formula(shape, normalize, n_cols):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(*shape, generator=g)
    proj, st = build_projector(V, normalize)
    assert st["form"] == ("F" if shape[0] > shape[1] else "C")  # never a dense C larger than the factor
    denom = V.norm() if normalize == "fro" else torch.linalg.matrix_norm(V, ord=2) ** 2
    C = V @ V.T / denom
    torch.testing.assert_close(proj.dense(), C, rtol=1e-5, atol=1e-6)
    if normalize == "spectral":
        assert abs(float(torch.linalg.eigvalsh(C).max()) - 1.0) < 1e-5
    dW = torch.randn(shape[0], n_cols or shape[1], generator=g, requires_grad=True)
    ref = ((torch.eye(shape[0]) - C) @ dW).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, dW)
    G = proj.penalty_op(dW.detach())   # (I - C)^2 dW: half the gradient, and <dW, G> is the value
    torch.testing.assert_close((dW.detach() * G).sum(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(2 * G, g_ref, rtol=1e-5, atol=1e-5)


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
    out = m.compute_loss(model, _batch(tiny_model), 0)   # the penalty acts in the hooks, not in the loss
    assert set(out.losses) == {"task"}
    handles = [p.register_hook(f) for p, f in m.grad_hooks(model).items()]
    out.total.backward()
    for h in handles:
        h.remove()
    logged = m.after_step(model, 0)   # the value the hooks measured, logged as metrics/asft
    assert logged["asft_penalty_raw"] == pytest.approx(outside, rel=1e-4)
    assert logged["asft"] == pytest.approx(m.lam * outside, rel=1e-4)


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


def _reference_grads(m, model, batch) -> dict[str, torch.Tensor]:
    """The former AsFT: task + lam * sum ||(I - C) Delta W||^2 as one autograd loss, dense C."""
    model.zero_grad(set_to_none=True)
    terms = []
    for n, mod in m.modules.items():
        C = m.subspace[n].dense().float()
        if m.lora:
            B, A, s = lora_factors(mod)
            dw = (B @ A) * (s if m.cfg.lora_scaling else 1.0)
        else:
            dw = base_weight(mod) - m.anchor[n].float()
        terms.append(((torch.eye(C.shape[0]) - C) @ dw).pow(2).sum())
    (m.task_loss(model, batch) + m.lam * torch.stack(terms).sum()).backward()
    return _grads(model)


def _hooked_grads(m, model, batches, hooks=True) -> dict[str, torch.Tensor]:
    """What the loop does for one optimizer step: hooks registered, sum of micro-batch loss / acc."""
    model.zero_grad(set_to_none=True)
    handles = [p.register_hook(f) for p, f in m.grad_hooks(model).items()] if hooks else []
    for b in batches:
        (m.compute_loss(model, b, 7).total / len(batches)).backward()
    for h in handles:
        h.remove()
    m.after_step(model, 7)
    return _grads(model)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("overrides", [(), ("training=lora",)], ids=["full", "lora"])
def test_hook_gradient_equals_the_autograd_penalty_gradient(tiny_model, weight_pair, tmp_path, overrides):
    m, model, _, _ = _asft(tiny_model, weight_pair, tmp_path, *overrides, lam=20.0, lora_scaling=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # an update away from the aligned weights (LoRA: both factors non-zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _batch(tiny_model)
    ref = _reference_grads(m, model, batch)
    got = _hooked_grads(m, model, [batch])
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    # without the hooks the gradient is the task's alone, visibly different
    bare = _hooked_grads(m, model, [batch], hooks=False)
    assert max(float((bare[n] - ref[n]).abs().max()) for n in ref) > 1e-2
    # accumulation: two half micro-batches (loss / 2 each) get the penalty's gradient once
    halves = [_batch(tiny_model, rows) for rows in ((0, 1), (2, 3))]
    task = [_hooked_grads(m, model, [h], hooks=False) for h in halves]
    acc = _hooked_grads(m, model, halves)
    for n in ref:   # the mean of the halves' task gradients + lam * the penalty's gradient (ref - bare), once
        torch.testing.assert_close(acc[n], (task[0][n] + task[1][n]) / 2 + ref[n] - bare[n], rtol=1e-4, atol=1e-6)


def test_offload_keeps_the_references_on_the_cpu_in_the_model_dtype(tiny_model, weight_pair, tmp_path):
    m, model, _, _ = _asft(tiny_model, weight_pair, tmp_path, offload=True)
    assert {t.device.type for t in m.anchor.values()} == {"cpu"}
    assert {p.tensor.device.type for p in m.subspace.projectors.values()} == {"cpu"}
    assert {t.dtype for t in m.anchor.values()} == {p.tensor.dtype for p in m.subspace.projectors.values()} \
        == {base_weight(next(iter(m.modules.values()))).dtype}
    assert m.record_info()["offload"] is True


def test_fp16_is_refused_with_the_fix(tiny_model, tmp_path):
    _, tok, fmt, _ = tiny_model
    from tests.conftest import compose

    from cwac.experiment.preflight import check_settings

    cfg = compose("model=tiny", "budget=smoke", "method=asft", "model.align=true", "training.precision=fp16")
    with pytest.raises(ValueError, match="training.precision=bf16"):   # pre-flight
        check_settings(cfg)


def test_missing_base_model_is_a_clear_error(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    m = make_method("asft", make_ctx(cfg, tok, fmt, tmp_path, start="x", base=None))
    with pytest.raises(ValueError, match="model.base_path"):
        m.prepare(tiny_model[0])


def _pen(m) -> float:
    return float(m.penalty().detach())


def _batch(tiny_model, rows=(0, 1, 2, 3)):
    from cwac.data.prompts import collate_train, pad_id
    from tests.baselines.conftest import features

    _, tok, fmt, _ = tiny_model
    feats = features(fmt, 4)
    return collate_train([feats[i] for i in rows], pad_id(tok))
