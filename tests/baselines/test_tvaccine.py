"""T-Vaccine: layers are sampled by the harmful-gradient norm at each attention output, on the
reference's schedule; the perturbation (norm rho over the sampled layers) acts in pass 2 on the
sampled layers only, and only their attention weights get a gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cwac.data.prompts import collate_train, pad_id
from cwac.losses import response_loss
from tests.baselines.conftest import features, make_ctx, make_method, padded_batch as _batch


def _tvaccine(tiny_model, tmp_path, **cfg):
    model, tok, fmt, tcfg = tiny_model
    m = make_method("tvaccine", make_ctx(tcfg, tok, fmt, tmp_path, stage="align"), **{"n_layers": 1, **cfg})
    m.prepare(model)
    return m


def _attn_out_grads(model, batch):
    caught = []
    hs = [layer.self_attn.register_forward_hook(lambda mod, a, o: caught.append(o[0])) for layer in model.model.layers]
    try:
        loss = response_loss(model, batch)
    finally:
        for h in hs:
            h.remove()
    return loss, torch.autograd.grad(loss, caught)


def test_importance_is_the_harmful_gradient_norm_at_each_attention_output(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _tvaccine(tiny_model, tmp_path, importance_batch_size=2)
    p = m.importance(model)
    hb = collate_train([m.harmful.features[i] for i in m.harmful.last_ids], m.harmful.pad)
    _, G = _attn_out_grads(model, hb)
    norms = np.array([float(g.norm()) for g in G])
    np.testing.assert_allclose(p, norms / norms.sum(), rtol=1e-5)
    assert all(q.grad is None for q in model.parameters())   # no parameter gradient written


def test_sampling_follows_the_importance_and_the_schedule(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _tvaccine(tiny_model, tmp_path, interval=2, importance_every=4)
    assert all(m.select(np.array([0.0, 1.0])) == [1] for _ in range(20))   # a layer with p = 1 is always sampled
    assert all(m.select(np.array([1.0, 0.0])) == [0] for _ in range(20))
    draws = [m.select(np.array([0.8, 0.2]))[0] for _ in range(400)]
    assert 0.7 < draws.count(0) / 400 < 0.9
    batch = _batch(tiny_model, 2)
    for step in range(6):
        for _ in range(2):   # two micro-batches per step share the schedule
            m.compute_loss(model, batch, step)
    assert [e["step"] for e in m.importance_log] == [0, 4]
    assert [e["step"] for e in m.selection_log] == [0, 2, 4]


def test_perturbation_only_on_the_sampled_layer_and_only_its_attention_is_trained(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _tvaccine(tiny_model, tmp_path, rho=3.0)
    m.probs = np.array([0.0, 1.0])   # layer 1 is the safety-critical one
    m._step, m.active = 0, m.select(m.probs)
    assert m.active == [1]
    batch = _batch(tiny_model)
    layers = model.model.layers
    seen = {0: [], 1: []}
    spies = [layers[i].post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args, i=i: seen[i].append(args[0].detach())) for i in (0, 1)]
    handles = [q.register_hook(fn) for q, fn in m.grad_hooks(model).items()]
    try:
        out = m.compute_loss(model, batch, step=0)
        out.total.backward()
    finally:
        for h in spies + handles:
            h.remove()
    assert len(seen[0]) == len(seen[1]) == 2   # two forward passes
    torch.testing.assert_close(seen[0][1], seen[0][0])   # layer 0's attention output: untouched in pass 2
    # layer 1's residual input carries layer 0's unchanged output, so the difference is eps_1 exactly
    torch.testing.assert_close(seen[1][1] - seen[1][0], m.last_eps[1], rtol=1e-4, atol=1e-5)
    assert set(m.last_eps) == {1}
    assert float(m.last_eps[1].norm()) == pytest.approx(3.0, rel=1e-5)   # the norm runs over the sampled layers
    _, G = _attn_out_grads(model, batch)
    torch.testing.assert_close(m.last_eps[1], 3.0 * G[1] / (G[1].norm() + 1e-7), rtol=1e-4, atol=1e-7)
    assert all(float(q.grad.abs().sum()) == 0 for q in layers[0].self_attn.parameters())   # unsampled: no update
    assert all(float(q.grad.abs().sum()) > 0 for q in layers[1].self_attn.parameters())
    assert all(float(q.grad.abs().sum()) > 0 for q in layers[0].mlp.parameters())   # the MLP stays trainable
    assert all(not layer.self_attn._forward_hooks for layer in layers)


def test_too_many_layers_and_the_finetune_stage(tiny_model, tmp_path):
    _, tok, fmt, _ = tiny_model
    from tests.conftest import compose

    with pytest.raises(ValueError, match="method.n_layers=8 but the model has 2 decoder layers"):
        _tvaccine(tiny_model, tmp_path, n_layers=8)
    from cwac.experiment.preflight import check_settings

    with pytest.raises(ValueError, match="method@alignment.method=tvaccine model.align=true"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=tvaccine"))
    ok = compose("model=tiny", "model.align=true", "method=tvaccine", "method@alignment.method=tvaccine")
    m = make_method("tvaccine", make_ctx(ok, tok, fmt, tmp_path))
    out = m.compute_loss(tiny_model[0], _batch(tiny_model), 0)
    assert set(out.losses) == {"task"} and not out.metrics and m.grad_hooks(tiny_model[0]) == {}


def test_smoke_cell_builds_its_own_aligned_artifact(tiny_cfg):   # 2 layers: S = 1
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            "method=tvaccine", "method@alignment.method=tvaccine", "alignment.method.n_layers=1",
                            "alignment.method.rho=0.1"))   # at rho=3 the tiny model's answers are all empty
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    assert rec["info"]["alignment"]["meta"]["method"] == "tvaccine" and rec["info"]["method"]["stage"] == "finetune"
    assert rec["info"]["method"]["alignment_method"]["name"] == "tvaccine"
