"""Lisa: the state switches at the configured optimizer steps, alignment steps train on alignment
rows, and the proximal term pulls towards the snapshot taken at the last switch."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from baselines._data import alignment_pool
from baselines.lisa import ALIGN, FINETUNE
from cwac.data.prompts import batch_rows, collate_train, is_packed, pad_id
from cwac.trainer import train
from tests.baselines.conftest import features, make_ctx, make_method, params


def _lisa(tiny_model, tmp_path, rows: int, tc: dict | None = None, **cfg):
    """Lisa on the tiny model; the run's config uses the same training node as ``_tc(**tc)``."""
    model, tok, fmt, tcfg = tiny_model
    ctx = make_ctx(OmegaConf.merge(tcfg, {"training": _tc(tcfg, **(tc or {}))}), tok, fmt, tmp_path / "art")
    m = make_method("lisa", ctx, **cfg)
    m.prepare(model)
    m.build_train_data([None] * rows)
    return m


def _tc(cfg, **kw):
    return OmegaConf.merge(cfg.training, {"epochs": 1, "micro_batch_size": 2, "max_grad_norm": 0.0, **kw})



def test_state_switches_at_the_configured_steps_and_alignment_steps_use_alignment_rows(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    m = _lisa(tiny_model, tmp_path, 20, align_steps=2, finetune_steps=3)
    feats = features(fmt, 20)
    seen: list[tuple[int, torch.Tensor]] = []
    orig = m.replace_batch
    m.replace_batch = lambda b, s: seen.append((s, (r := orig(b, s)))) or r
    res = train(model, feats, m, _tc(cfg), tok, seed=0)
    states = [int(h["metrics/lisa_state"]) for h in res.history]
    assert states == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0] and m.switches == [1, 4, 6]  # no snapshot after the last step
    pad = pad_id(tok)
    strip = lambda rows: {tuple(t for t in r if t != pad) for r in rows}  # noqa: E731
    pool, user = strip(f["input_ids"] for f in m.pool), strip(f["input_ids"] for f in feats)
    assert len(seen) == 10

    def rows(batch):   # the batch's examples, padded or packed (the replacement is packed like the batch)
        if is_packed(batch):
            return [batch["input_ids"][0][batch["seq_idx"][0] == i].tolist() for i in range(batch_rows(batch))]
        return batch["input_ids"].tolist()

    assert all(is_packed(b) == bool(cfg.training.packing) for _, b in seen)
    for step, batch in seen:
        assert strip(rows(batch)) <= (pool if m.state(step) == ALIGN else user)
    # alignment steps log the alignment loss, fine-tune steps the task loss
    assert all(("losses/alignment" in h) == (s == ALIGN) for h, s in zip(res.history, states))
    # no proximal term in the first 10% of the steps (steps 0 and 1 of 10)
    assert [("losses/proximal" in h) for h in res.history[:3]] == [False, False, True]


def test_anchor_is_the_snapshot_of_the_last_switch(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    feats = features(fmt, 12)
    init = copy.deepcopy(model)
    one = copy.deepcopy(model)
    train(one, feats, _lisa((one, tok, fmt, cfg), tmp_path, 12, {"max_steps": 1}, align_steps=1, finetune_steps=2),
          _tc(cfg, max_steps=1), tok, seed=0)
    m = _lisa(tiny_model, tmp_path, 12, {"max_steps": 3}, align_steps=1, finetune_steps=2)
    train(model, feats, m, _tc(cfg, max_steps=3), tok, seed=0)  # states A, F, F: one switch, after step 0
    assert m.switches == [0]
    after_step0, start, final = params(one), params(init), params(model)
    for n, a in m.anchor.items():
        torch.testing.assert_close(a, after_step0[n], rtol=0, atol=0)
    assert any(not torch.equal(m.anchor[n], start[n]) for n in m.anchor)
    assert any(not torch.equal(m.anchor[n], final[n]) for n in m.anchor)


def test_proximal_term_pulls_towards_the_anchor(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    m = _lisa(tiny_model, tmp_path, 100, rho=0.5, prox_off_fraction=0.0)
    m._snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prox = m.proximal(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(prox, [dict(model.named_parameters())[n] for n in names])
    dist0 = sum(float(((p.detach() - m.anchor[n]) ** 2).sum()) for n, p in model.named_parameters())
    for n, g in zip(names, grads):
        torch.testing.assert_close(g, 0.5 * (dict(model.named_parameters())[n] - m.anchor[n]))
    with torch.no_grad():  # a gradient step on the proximal term alone moves towards the anchor
        for n, g in zip(names, grads):
            dict(model.named_parameters())[n].sub_(0.5 * g)
    dist1 = sum(float(((p.detach() - m.anchor[n]) ** 2).sum()) for n, p in model.named_parameters())
    assert dist1 == pytest.approx(0.75 ** 2 * dist0, rel=1e-4)
    loss = m.compute_loss(model, collate_train(features(fmt, 2), pad_id(tok)), step=5)
    assert set(loss.losses) == {"task", "proximal"} and m.state(5) == FINETUNE


def test_alignment_pool_is_an_artifact_of_the_recipe(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    ctx = make_ctx(cfg, tok, fmt, tmp_path / "art")
    rows = alignment_pool(ctx)
    assert len(rows) == cfg.alignment.n_harmful + cfg.alignment.n_harmless
    assert {r.source for r in rows} == {"refusal", "alpaca"}
    assert alignment_pool(ctx) == rows and len(list((tmp_path / "art" / "alignment_rows").glob("*/artifact.json"))) == 1
