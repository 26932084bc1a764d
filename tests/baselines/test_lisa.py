"""Lisa: the state switches at the configured optimizer steps, alignment steps train on alignment
rows, and the proximal term pulls towards the snapshot taken at the last switch, through a
gradient hook that gives the former loss term's gradient, once per step."""

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
    assert [("metrics/proximal" in h) for h in res.history[:3]] == [False, False, True]
    assert all("losses/proximal" not in h for h in res.history)   # a gradient hook, not a loss term


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


def _step_grads(m, model, batches, step: int, hooks=True) -> dict[str, torch.Tensor]:
    """One optimizer step as the loop runs it: hooks registered, sum of micro-batch loss / acc."""
    model.zero_grad(set_to_none=True)
    handles = [p.register_hook(f) for p, f in m.grad_hooks(model).items()] if hooks else []
    for b in batches:
        (m.compute_loss(model, b, step).total / len(batches)).backward()
    for h in handles:
        h.remove()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_proximal_hook_gives_the_former_loss_gradient_once_per_step(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    m = _lisa(tiny_model, tmp_path, 100, rho=0.5, prox_off_fraction=0.0)
    feats = features(fmt, 4)
    batch, halves = collate_train(feats, pad_id(tok)), [collate_train(feats[i:i + 2], pad_id(tok)) for i in (0, 2)]
    _step_grads(m, model, [batch], step=0)   # step 0's hooks take the anchor: the starting weights
    start = params(model)
    assert m.anchor.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, a in m.anchor.items():
        torch.testing.assert_close(a, start[n], rtol=0, atol=0)
        assert a.dtype == start[n].dtype
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    named = dict(model.named_parameters())
    # the former Lisa: rho/2 ||w - w_tilde||^2 (float32) in the loss
    model.zero_grad(set_to_none=True)
    prox = m.rho / 2 * torch.stack([((named[n].float() - a.float()) ** 2).sum() for n, a in m.anchor.items()]).sum()
    (m.task_loss(model, batch) + prox).backward()
    ref = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    got = _step_grads(m, model, [batch], step=5)
    logged = m.after_step(model, 5)   # what the hooks measured at step 5
    bare = _step_grads(m, model, [batch], step=6, hooks=False)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[n] - bare[n], 0.5 * (named[n] - m.anchor[n]).detach(), rtol=1e-4, atol=1e-7)
    assert max(float((got[n] - bare[n]).abs().max()) for n in ref) > 1e-3   # the hook is what adds it
    assert logged["proximal"] == pytest.approx(float(prox.detach()), rel=1e-5)
    assert logged["lisa_drift_sq"] == pytest.approx(2 * float(prox.detach()) / m.rho, rel=1e-5)
    # accumulation: two micro-batches (loss / 2 each) get the proximal gradient once
    task = [_step_grads(m, model, [h], step=10 + i, hooks=False) for i, h in enumerate(halves)]
    acc = _step_grads(m, model, halves, step=5)
    for n in ref:
        torch.testing.assert_close(acc[n], (task[0][n] + task[1][n]) / 2 + 0.5 * (named[n] - m.anchor[n]).detach(),
                                   rtol=1e-4, atol=1e-6)
    loss = m.compute_loss(model, batch, step=5)
    assert set(loss.losses) == {"task"} and m.state(5) == FINETUNE


def test_offload_keeps_the_anchor_on_the_cpu_and_fp16_is_refused(tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    m = _lisa(tiny_model, tmp_path, 100, offload=True)
    _step_grads(m, model, [collate_train(features(fmt, 2), pad_id(tok))], step=0)
    assert m.anchor and {a.device.type for a in m.anchor.values()} == {"cpu"} and m.record_info()["offload"]
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    with pytest.raises(ValueError, match="training.precision=fp16 is not supported"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=lisa", "training.precision=fp16"))


def test_paper_scale_uses_the_reference_split(tmp_path):
    from tests.conftest import compose

    cpu, paper = compose("method=lisa").method, compose("method=lisa", "budget=paper").method
    assert (cpu.align_steps, cpu.finetune_steps) == (2, 8)
    assert (paper.align_steps, paper.finetune_steps) == (100, 900)


def test_alignment_pool_is_an_artifact_of_the_recipe(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    ctx = make_ctx(cfg, tok, fmt, tmp_path / "art")
    rows = alignment_pool(ctx)
    assert len(rows) == cfg.alignment.n_harmful + cfg.alignment.n_harmless
    assert {r.source for r in rows} == {"refusal", "alpaca"}
    assert alignment_pool(ctx) == rows and len(list((tmp_path / "art" / "alignment_rows").glob("*/artifact.json"))) == 1
