"""LDIFS: the penalty is rho/2 * sum_l ||mlp_l(w) - mlp_l(w_aligned)||^2 over real tokens, against
features of the aligned weights that stay fixed while the model trains, and its gradient reaches
the model (and lowers the distance); LoRA's adapter-off reference equals the frozen copy."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from cwac.data.prompts import collate_packed, collate_train, pad_id
from cwac.losses import response_loss
from cwac.modeling import decoder_layers, lora_factors, linear_modules
from tests.baselines.conftest import features, make_ctx, make_method


def _ldifs(tiny_model, tmp_path, *overrides, **cfg):
    from tests.conftest import compose

    model, tok, fmt, _ = tiny_model
    ccfg = compose("model=tiny", "budget=smoke", "method=ldifs", *overrides)
    return make_method("ldifs", make_ctx(ccfg, tok, fmt, tmp_path), **cfg)


def _mlp_outputs(model, batch) -> list[torch.Tensor]:
    """Independent of the module: every decoder layer's MLP output on ``batch``."""
    out = []
    hs = [layer.mlp.register_forward_hook(lambda mod, a, o: out.append(o.detach())) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hs:
            h.remove()
    return out


def _perturb(model, scale=0.02, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _batch(tiny_model, n=4):
    _, tok, fmt, _ = tiny_model
    return collate_train(features(fmt, n, max_len=160), pad_id(tok))


def test_distance_is_to_frozen_aligned_features_and_its_gradient_reaches_the_model(tiny_model, tmp_path):
    model, *_ = tiny_model
    aligned = copy.deepcopy(model)
    m = _ldifs(tiny_model, tmp_path, rho=1.0, skip_above=None)
    m.prepare(model)
    _perturb(model)                              # the model trains away from the aligned weights
    batch = _batch(tiny_model)
    assert (batch["attention_mask"] == 0).any()  # padded rows: pads must not count
    out = m.compute_loss(model, batch, step=0)

    # the reference features are the aligned model's, not the moved model's
    ref = m.reference_features(model, batch)
    for r, a in zip(ref, _mlp_outputs(aligned, batch)):
        assert not r.requires_grad
        torch.testing.assert_close(r, a)
    moved = _mlp_outputs(model, batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = sum(0.5 * (((f - a) * mask) ** 2).sum() for f, a in zip(moved, _mlp_outputs(aligned, batch)))
    assert float(expected) > 0
    torch.testing.assert_close(out.losses["ldifs"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.losses["task"], response_loss(model, batch))   # the hooks change no task loss

    # its gradient reaches the model, and a step along it lowers the distance
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.losses["ldifs"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    with torch.no_grad():
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(1e-3 * g / norm)
    assert float(m.compute_loss(model, batch, 1).losses["ldifs"].detach()) < float(out.losses["ldifs"].detach())


def test_the_frozen_reference_does_not_move_when_the_model_trains(tiny_model, tmp_path):
    from cwac.trainer import train
    from tests.conftest import compose

    model, tok, fmt, _ = tiny_model
    aligned = copy.deepcopy(model)
    m = _ldifs(tiny_model, tmp_path)
    m.prepare(model)
    tc = OmegaConf.merge(compose("model=tiny", "budget=smoke").training, {"max_steps": 3, "lr": 1e-2})
    res = train(model, features(fmt, 12), m, tc, tok, seed=0)
    assert res.steps == 3 and m.calls == 3
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), aligned.parameters()))  # it trained
    for (n, p), q in zip(m.frozen.named_parameters(), aligned.parameters()):
        assert torch.equal(p, q), n                                                            # the copy did not
    assert "losses/ldifs" in res.history[-1] and res.history[-1]["losses/ldifs"] > 0
    batch = _batch(tiny_model)
    for r, a in zip(m.reference_features(model, batch), _mlp_outputs(aligned, batch)):
        torch.testing.assert_close(r, a)


def test_packed_and_padded_batches_give_the_same_penalty(tiny_model, tmp_path):
    model, tok, fmt, _ = tiny_model
    m = _ldifs(tiny_model, tmp_path, rho=1.0, skip_above=None)
    m.prepare(model)
    _perturb(model)
    feats = features(fmt, 4, max_len=160)
    padded = m.compute_loss(model, collate_train(feats, pad_id(tok)), 0).losses["ldifs"]
    packed = m.compute_loss(model, collate_packed(feats), 0).losses["ldifs"]
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-6)


def test_layer_terms_at_or_above_skip_above_are_left_out(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _ldifs(tiny_model, tmp_path, rho=1.0, skip_above=None)
    m.prepare(model)
    _perturb(model)
    batch = _batch(tiny_model)
    feats, ref = _mlp_outputs(model, batch), m.reference_features(model, batch)
    from baselines.ldifs import feature_distances

    terms = [0.5 * float(d) for d in feature_distances(feats, ref, batch["attention_mask"])]
    assert len(terms) == 2 and terms[0] != terms[1]
    m.skip_above = (terms[0] + terms[1]) / 2          # one layer below, one above
    out = m.compute_loss(model, batch, 0)
    assert out.metrics["ldifs_layers_skipped"] == 1.0
    assert float(out.losses["ldifs"].detach()) == pytest.approx(min(terms), rel=1e-5)
    m.skip_above = 0.0                                 # every term skipped: a zero penalty, the task loss alone
    out = m.compute_loss(model, batch, 0)
    assert float(out.losses["ldifs"]) == 0.0 and out.metrics["ldifs_layers_skipped"] == 2.0


def test_lora_adapter_off_reference_equals_the_frozen_copy(tiny_model, tmp_path):
    from cwac.experiment.cell import apply_lora
    from tests.conftest import compose

    model, *_ = tiny_model
    lora = apply_lora(model, compose("model=tiny", "training=lora").training.lora)
    off = _ldifs(tiny_model, tmp_path, "training=lora", rho=1.0, skip_above=None)
    cp = _ldifs(tiny_model, tmp_path, "training=lora", rho=1.0, skip_above=None, reference="copy")
    assert off.mode == "adapter_off"
    off.prepare(lora)
    cp.prepare(lora)
    assert sum(p.numel() for p in cp.frozen.parameters()) > 0
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():                               # LoRA training moves only the adapter
        for mod in linear_modules(lora, ["q_proj", "v_proj"]).values():
            B = lora_factors(mod)[0]
            B.copy_(0.1 * torch.randn(B.shape, generator=g))
    batch = _batch(tiny_model)
    a, b = off.compute_loss(lora, batch, 0), cp.compute_loss(lora, batch, 0)
    assert float(a.losses["ldifs"].detach()) > 0
    torch.testing.assert_close(a.losses["ldifs"], b.losses["ldifs"], rtol=1e-5, atol=1e-7)
    again = _ldifs(tiny_model, tmp_path, "training=lora")
    with pytest.raises(ValueError, match="adapter starts at zero"):   # a non-zero adapter is not the aligned model
        again.prepare(lora)


def test_reference_dtype_and_bad_settings(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _ldifs(tiny_model, tmp_path, reference_dtype="bfloat16")
    m.prepare(model)
    assert {p.dtype for p in m.frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(not p.requires_grad for p in m.frozen.parameters())
    out = m.compute_loss(model, _batch(tiny_model), 0)
    assert torch.isfinite(out.total)
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    with pytest.raises(ValueError, match="method.reference=adapter_off needs LoRA"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=ldifs", "method.reference=adapter_off"))


def test_preflight_names_a_bad_reference_before_any_model_loads():
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    check_settings(compose("model=tiny", "budget=smoke", "method=ldifs"))
    bad = r"method.reference: Invalid value 'nope', expected one of \[auto, copy, adapter_off\]"
    with pytest.raises(ValueError, match=bad):
        check_settings(compose("model=tiny", "budget=smoke", "method=ldifs", "method.reference=nope"))
    with pytest.raises(ValueError, match="method.reference_dtype: Invalid value 'bf16'"):
        check_settings(compose("model=tiny", "budget=smoke", "method=ldifs", "method.reference_dtype=bf16"))


def test_cell_runs_and_records_ldifs(tiny_cfg):
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            "method=ldifs"))
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    info = rec["info"]["method"]
    assert info["reference"] == "copy" and info["n_layers"] == 2 and info["micro_batches"] == rec["info"]["steps"]
    assert info["rho"] == 1e-4 and info["skip_above"] == 0.1
