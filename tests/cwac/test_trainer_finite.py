"""A cell is only "complete" when training stayed finite: the loop checks the loss and the gradient
norm at every optimizer step and the weights once after training, naming the 1-based step (as in
train_log.jsonl) and the term that went bad."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cwac.api import LossOutput, Method, TrainContext
from cwac.data.mix import build_finetune_mix
from cwac.trainer import train
from cwac.tracking import RunLogger


class _Breaks(Method):
    """Plain SFT that goes bad at optimizer step ``at`` (1-based) in the way ``how`` says."""

    def __init__(self, cfg, ctx, how: str, at: int):
        super().__init__(cfg, ctx)
        self.how, self.at = how, at

    def compute_loss(self, model, batch, step):
        losses = {"task": self.task_loss(model, batch)}
        if step + 1 == self.at and self.how == "loss":
            losses["penalty"] = torch.tensor(float("nan"))
        if step + 1 == self.at and self.how == "grad":   # a finite loss (0) whose gradient is inf
            p = next(model.parameters())
            z = p.sum() - p.sum().detach()
            losses["penalty"] = torch.sqrt(z * z)
        return LossOutput(losses)

    def after_step(self, model, step):
        if step + 1 == self.at and self.how == "weights":   # after the last update: no later loss sees it
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return {}


def _train(tiny_model, how, at, steps, logger=None):
    model, tok, fmt, cfg = tiny_model
    feats = [fmt.train_features(e, 64) for e in build_finetune_mix("sst2", 8, 0.25, seed=0)]
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None,
                                   start_model_path="")
    tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": steps, "micro_batch_size": 2, "lr": 1e-3})
    return train(model, feats, _Breaks(OmegaConf.create({"name": "sft"}), ctx, how, at), tc, tok, seed=0,
                 logger=logger)


def test_a_non_finite_loss_names_its_term_and_the_1_based_step(tiny_model):
    with pytest.raises(FloatingPointError, match=r"loss term\(s\) penalty at step 2 \(1-based"):
        _train(tiny_model, "loss", at=2, steps=3)


def test_a_non_finite_grad_norm_fails_at_its_step_and_is_logged_as_null(tiny_model, tmp_path):
    logger = RunLogger(OmegaConf.create({"name": "none"}), tmp_path, {}, "t", None, [])
    with pytest.raises(FloatingPointError, match=r"non-finite grad_norm \(\w+\) at step 2 \(1-based"):
        _train(tiny_model, "grad", at=2, steps=3, logger=logger)
    logger.finish()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in train_log"))
            for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["train/grad_norm"] is None
    assert rows[-1]["nonfinite"] == ["train/grad_norm"]


def test_non_finite_weights_after_training_fail(tiny_model):
    with pytest.raises(FloatingPointError, match=r"non-finite weights in \S+ after training \(2 steps\)"):
        _train(tiny_model, "weights", at=2, steps=2)


def test_a_finite_run_passes(tiny_model):
    assert _train(tiny_model, "none", at=0, steps=2).steps == 2
