"""Resumable training (cwac.resume): a run killed after a checkpoint and run again ends on the very
weights, optimizer trajectory and history of the uninterrupted run, methods' batch streams and RNG
streams included; a checkpoint of another run is not used; the knob changes no hash."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from cwac.api import LossOutput, TrainContext
from cwac.data.mix import build_finetune_mix
from cwac.experiment.plugins import get_method
from cwac.resume import LATEST, declared_step_state
from cwac.trainer import train
from tests.baselines.conftest import make_ctx, make_method

STEPS = 5


class Killed(Exception):
    """Stands in for the process being killed after an optimizer step."""


def _features(fmt, n=20, max_len=48):
    return [fmt.train_features(e, max_len) for e in build_finetune_mix("sst2", n, 0.25, seed=0)]


def _tc(cfg, **kw):
    return OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": STEPS, "micro_batch_size": 4, "lr": 3e-3,
                                          "lr_schedule": "linear", "warmup_ratio": 0.2, "packing": False,
                                          "checkpoint_minutes": 1e-9, **kw})   # a checkpoint after every step


class GlobalNoise(get_method("sft")):
    """SFT whose loss is scaled by a draw from the global torch stream: the resumed run must continue
    that stream, not restart it."""

    step_state = ()

    def compute_loss(self, model, batch, step):
        out = super().compute_loss(model, batch, step)
        return LossOutput({"task": out.losses["task"] * (1 + torch.rand(()))})


def _method(name, tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    if name in ("sft", "global_noise"):
        ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None,
                                       stage="finetune", start_model_path="")
        return (GlobalNoise if name == "global_noise" else get_method("sft"))(OmegaConf.create({"name": "sft"}), ctx)
    own = {"tvaccine": {"n_layers": 1, "interval": 2, "importance_every": 3}}.get(name, {"harmful_batch_size": 2})
    return make_method(name, make_ctx(cfg, tok, fmt, tmp_path, stage="align"), **own)   # T-Vaccine: draws mid-run


def _run(name, tiny_model, tmp_path, start, resume_dir, kill_after=None, **tc):
    """Train a copy of ``start`` with method ``name``; ``kill_after``: raise after that many steps."""
    _, tok, fmt, cfg = tiny_model
    model = copy.deepcopy(start)
    m = _method(name, tiny_model, tmp_path)
    m.prepare(model)
    calls = []
    inner = m.compute_loss

    def counted(model_, batch, step):
        calls.append(step)
        return inner(model_, batch, step)

    m.compute_loss = counted   # on the instance: the class's declaration (step_state) is what counts
    if kill_after is not None:
        def after_step(model_, step):
            if step == kill_after:   # dies inside the step after the last checkpoint
                raise Killed
            return {}
        m.after_step = after_step
    torch.manual_seed(123)   # the global stream a resumed run must continue, not restart
    try:
        res = train(model, _features(fmt), m, _tc(cfg, **tc), tok, seed=7, resume_dir=resume_dir)
    except Killed:
        return None, model, calls
    return res, model, calls


def _same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


@pytest.mark.parametrize("name", ["sft", "global_noise", "booster", "repnoise", "tvaccine"])
def test_a_killed_run_resumes_onto_the_uninterrupted_weights(tiny_model, tmp_path, name):
    start = copy.deepcopy(tiny_model[0])
    ref, ref_model, _ = _run(name, tiny_model, tmp_path, start, None)
    folder = tmp_path / "resume"
    dead, _, calls = _run(name, tiny_model, tmp_path, start, folder, kill_after=2)
    assert dead is None and calls == [0, 1, 2]
    assert (folder / LATEST).read_text().strip() == "2"          # steps 1 and 2 were saved, step 3 was lost
    assert len(list(folder.glob("state-*-rank0.pt"))) == 1     # only the newest checkpoint is kept
    res, model, calls = _run(name, tiny_model, tmp_path, start, folder)
    assert res.resumed_from == 2 and calls == [2, 3, 4]          # it went on from the checkpoint
    assert [g["from_step"] for g in res.segments] == [0, 2] and ref.segments[0]["from_step"] == 0
    _same(model, ref_model)                                      # weights, Adam moments, schedule, streams
    assert [h["losses/total"] for h in res.history] == [h["losses/total"] for h in ref.history]
    assert [h["lr"] for h in res.history] == [h["lr"] for h in ref.history]
    assert not folder.exists()                                   # removed once training completed


def test_a_checkpoint_of_another_run_is_not_used(tiny_model, tmp_path):
    start = copy.deepcopy(tiny_model[0])
    folder = tmp_path / "resume"
    _run("sft", tiny_model, tmp_path, start, folder, kill_after=2)
    ref, ref_model, _ = _run("sft", tiny_model, tmp_path, start, None, lr=1e-3)
    res, model, calls = _run("sft", tiny_model, tmp_path, start, folder, lr=1e-3)   # another learning rate
    assert res.resumed_from is None and calls == list(range(STEPS))
    _same(model, ref_model)


def test_a_method_that_declares_no_step_state_trains_without_checkpoints(tiny_model, tmp_path):
    sft = get_method("sft")

    class Undeclared(sft):   # inherits SFT's hooks, not its declaration
        pass

    assert declared_step_state(_method("sft", tiny_model, tmp_path)) == ()
    model, tok, fmt, cfg = tiny_model
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None, stage="finetune",
                                   start_model_path="")
    m = Undeclared(OmegaConf.create({"name": "sft"}), ctx)
    assert declared_step_state(m) is None
    folder = tmp_path / "resume"
    m.after_step = lambda model_, step: (_ for _ in ()).throw(Killed) if step == 2 else {}
    with pytest.raises(Killed):
        train(copy.deepcopy(model), _features(fmt), m, _tc(cfg), tok, seed=7, resume_dir=folder)
    assert not folder.exists()


def test_checkpoint_minutes_changes_no_hash(tiny_cfg):
    from cwac.experiment.align import aligned_key
    from cwac.records import config_hash
    from cwac.utils import stable_hash

    a, b = tiny_cfg(), tiny_cfg("training.checkpoint_minutes=5")
    c = tiny_cfg("+alignment.training.checkpoint_minutes=5")
    assert config_hash(a) == config_hash(b) == config_hash(c)
    assert stable_hash(aligned_key(a)) == stable_hash(aligned_key(b)) == stable_hash(aligned_key(c))
    assert config_hash(a) != config_hash(tiny_cfg("training.weight_decay=0.1"))


def test_code_digest_covers_the_training_code_and_not_the_reports(tmp_path):
    from cwac.resume import code_digest

    for rel in ("cwac/trainer.py", "cwac/reports/tables.py", "cwac/plan/__init__.py", "baselines/booster.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    d = code_digest(tmp_path)
    (tmp_path / "cwac/reports/tables.py").write_text("x = 2\n")
    (tmp_path / "cwac/plan/__init__.py").write_text("x = 2\n")
    assert code_digest(tmp_path) == d   # a table or the memory planner changed: the checkpoint stands
    for rel in ("cwac/trainer.py", "baselines/booster.py"):
        (tmp_path / rel).write_text("x = 3\n")
        assert code_digest(tmp_path) != d
        d = code_digest(tmp_path)
