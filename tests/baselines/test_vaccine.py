"""Vaccine: the perturbation is rho * G / ||G|| on the attention outputs, applied in the second pass
only, without touching parameter gradients; fine-tuning after it is plain SFT."""

from __future__ import annotations

import pytest
import torch

from cwac.modeling import decoder_layers
from cwac.data.prompts import collate_train, pad_id
from cwac.losses import sequence_mean_ce
from tests.baselines.conftest import features, make_ctx, make_method, padded_batch as _batch


def _vaccine(tiny_model, tmp_path, **cfg):
    model, tok, fmt, tcfg = tiny_model
    return make_method("vaccine", make_ctx(tcfg, tok, fmt, tmp_path, stage="align"), **cfg)


def test_perturbation_has_norm_rho_follows_the_gradient_and_acts_in_pass_two_only(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _vaccine(tiny_model, tmp_path, rho=2.0)
    batch = _batch(tiny_model)
    layers = decoder_layers(model)
    # the input of layer 0's post-attention norm is residual + attention output (+ eps in pass 2)
    seen: list[torch.Tensor] = []
    spy = layers[0].post_attention_layernorm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        clean = seen.pop()
        out = m.compute_loss(model, batch, step=0)
    finally:
        spy.remove()
    assert len(seen) == 2  # two forward passes
    torch.testing.assert_close(seen[0], clean)  # pass 1 is unperturbed
    torch.testing.assert_close(seen[1] - seen[0], m.last_eps[0], rtol=1e-4, atol=1e-5)  # pass 2 adds eps_0
    total = torch.sqrt(sum((e ** 2).sum() for e in m.last_eps))
    assert float(total) == pytest.approx(2.0, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # pass 1 wrote no parameter gradient
    assert all(not layer.self_attn._forward_hooks for layer in layers)  # every hook removed
    # eps is the normalised gradient of the alignment loss w.r.t. the attention outputs
    caught = []
    hs = [layer.self_attn.register_forward_hook(lambda mod, a, o: caught.append(o[0])) for layer in layers]
    try:
        o = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss1 = sequence_mean_ce(o.logits, batch["labels"])
    finally:
        for h in hs:
            h.remove()
    G = torch.autograd.grad(loss1, caught)
    gnorm = torch.sqrt(sum((g ** 2).sum() for g in G))
    for e, g in zip(m.last_eps, G):
        torch.testing.assert_close(e, 2.0 * g / (gnorm + 1e-7), rtol=1e-4, atol=1e-7)
    assert out.metrics["vaccine_loss_unperturbed"] == pytest.approx(float(loss1.detach()), rel=1e-5)
    assert float(out.losses["task"].detach()) > float(loss1.detach())  # the worst-case (ascent) perturbation raises the loss


def test_per_example_norm(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _vaccine(tiny_model, tmp_path, rho=3.0, norm="example")
    m.compute_loss(model, _batch(tiny_model), step=0)
    per_ex = torch.sqrt(sum((e ** 2).flatten(1).sum(1) for e in m.last_eps))
    torch.testing.assert_close(per_ex, torch.full_like(per_ex, 3.0), rtol=1e-5, atol=1e-6)


def test_finetune_stage_requires_a_vaccine_alignment(tiny_model, tmp_path):
    _, tok, fmt, _ = tiny_model
    from tests.conftest import compose

    from cwac.experiment.preflight import check_settings

    with pytest.raises(ValueError, match="method@alignment.method=vaccine model.align=true"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=vaccine"))
    ok = compose("model=tiny", "model.align=true", "method=vaccine", "method@alignment.method=vaccine")
    m = make_method("vaccine", make_ctx(ok, tok, fmt, tmp_path))
    out = m.compute_loss(tiny_model[0], _batch(tiny_model), 0)
    assert set(out.losses) == {"task"} and not out.metrics  # plain SFT
