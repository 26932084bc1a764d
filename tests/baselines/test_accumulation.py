"""Gradient accumulation equals the larger batch for the multi-pass / regularised methods.

The reference Vaccine zeroes gradients between its two passes (dropping every micro-batch but the
last) and AsFT adds its penalty undivided per micro-batch (acc times). Here every method's loss is
a per-micro-batch quantity that the engine averages, so micro_batch 2 x acc 2 = micro_batch 4 x 1
(sequence-mean loss; exact up to float rounding). Checked on the accumulated gradient (sensitive
to any scale error) and on the parameters after real optimizer steps of ``cwac.trainer.train``.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf

from cwac.data.prompts import collate_train, pad_id
from cwac.models import load_model
from cwac.trainer import train
from tests.baselines.conftest import features, make_ctx, make_method


def _accumulated_grads(method, model, feats, tok, micro: int) -> dict[str, torch.Tensor]:
    """What the loop does for one optimizer step: the method's gradient hooks registered, sum over
    micro-batches of loss / acc, then ``after_step``."""
    model.zero_grad(set_to_none=True)
    handles = [p.register_hook(f) for p, f in method.grad_hooks(model).items()]
    acc = len(feats) // micro
    for i in range(acc):
        batch = collate_train(feats[i * micro: (i + 1) * micro], pad_id(tok))
        (method.compute_loss(model, batch, 0).total / acc).backward()
    for h in handles:
        h.remove()
    method.after_step(model, 0)
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# Parameters after AdamW steps: Adam divides each gradient entry by its own magnitude, so an entry
# whose gradient is ~0 turns float rounding into a visible share of one step (lr 1e-3; an AVX-512
# host measured 2.0e-5 and 3.5e-5 on 1 of 32768 entries in two runs), while a real scale error
# moves most entries by O(lr). So: all but 0.1% of the entries within 2% of a step, and every entry
# within 30% of one.
STEP_ATOL = 2e-5


def _assert_same_steps(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    diffs = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    assert float((diffs > STEP_ATOL).float().mean()) <= 1e-3, "more than 0.1% of the entries moved apart"
    assert float(diffs.max()) <= 15 * STEP_ATOL


def _trained(model, feats, method_factory, cfg, tok, micro, acc, steps):
    m = copy.deepcopy(model)
    tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": steps, "lr": 1e-3, "max_grad_norm": 0.0,
                                        "micro_batch_size": micro, "gradient_accumulation_steps": acc})
    train(m, feats, method_factory(OmegaConf.merge(cfg, {"training": tc})), tc, tok, seed=3)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_vaccine_accumulated_gradient_equals_the_larger_batch(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    feats = features(fmt, 4)
    vac = lambda **kw: make_method("vaccine", make_ctx(cfg, tok, fmt, tmp_path, stage="align"), **kw)  # noqa: E731
    big = _accumulated_grads(vac(norm="example"), model, feats, tok, micro=4)
    _assert_same(_accumulated_grads(vac(norm="example"), model, feats, tok, micro=2), big)
    # the reference's batch norm over single-example micro-batches is the per-example norm
    _assert_same(_accumulated_grads(vac(norm="batch"), model, feats, tok, micro=1), big)
    # ... and every micro-batch counts (dropping one, as zero_grad between passes does, changes it)
    half = _accumulated_grads(vac(norm="example"), model, feats[2:], tok, micro=2)
    assert any(not torch.allclose(half[n] / 2, big[n], rtol=1e-3, atol=1e-6) for n in big)


def test_vaccine_trainer_steps_match_under_accumulation(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    feats = features(fmt, 8)
    factory = lambda c: make_method("vaccine", make_ctx(c, tok, fmt, tmp_path, stage="align"), norm="example")  # noqa: E731
    _assert_same_steps(_trained(model, feats, factory, cfg, tok, 2, 2, 2),
                       _trained(model, feats, factory, cfg, tok, 4, 1, 2))


def test_asft_penalty_counts_once_per_step(tiny_model, weight_pair, tmp_path):
    base, aligned, *_ = weight_pair
    _, tok, fmt, cfg = tiny_model
    feats = features(fmt, 8)

    def asft(c, model):
        m = make_method("asft", make_ctx(c, tok, fmt, tmp_path / "art", start=aligned, base=base), lam=50.0)
        m.prepare(model)
        return m

    # gradient level, with an update already away from the aligned weights
    model, _ = load_model(str(aligned))
    m = asft(cfg, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    _assert_same(_accumulated_grads(m, model, feats[:4], tok, 2), _accumulated_grads(m, model, feats[:4], tok, 4))
    # trainer level: two steps (the penalty is zero at step 0 and acts at step 1)
    runs = []
    for micro, acc in ((2, 2), (4, 1)):
        model, _ = load_model(str(aligned))
        tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": 2, "lr": 1e-3, "max_grad_norm": 0.0,
                                            "micro_batch_size": micro, "gradient_accumulation_steps": acc})
        res = train(model, feats, asft(OmegaConf.merge(cfg, {"training": tc}), model), tc, tok, seed=3)
        assert res.history[0]["metrics/asft"] == 0.0 and res.history[1]["metrics/asft"] > 0
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    _assert_same_steps(*runs)


def test_lisa_trainer_steps_match_under_accumulation(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    feats = features(fmt, 8)

    def factory(c):  # step 0 alignment, step 1 fine-tune with the proximal term towards the switch snapshot
        m = make_method("lisa", make_ctx(c, tok, fmt, tmp_path), align_steps=1, finetune_steps=1,
                        prox_off_fraction=0.0, rho=5.0)
        m.prepare(model)
        m.build_train_data(feats)
        return m

    _assert_same_steps(_trained(model, feats, factory, cfg, tok, 2, 2, 2),
                       _trained(model, feats, factory, cfg, tok, 4, 1, 2))
