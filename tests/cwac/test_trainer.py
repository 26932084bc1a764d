"""The one training loop: DeepSpeed engine, loss falls, accumulation is exact, hooks fire."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from cwac.data.mix import build_finetune_mix
from cwac.api import LossOutput, Method, TrainContext
from cwac.experiment.plugins import get_method
from cwac.trainer import train


def _features(fmt, n=16, max_len=64):
    rows = build_finetune_mix("sst2", n, 0.25, seed=0)
    return [fmt.train_features(e, max_len) for e in rows]


def _method(cfg, tok, fmt, name="sft"):
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None, stage="finetune",
                       start_model_path="")
    return get_method(name)(OmegaConf.create({"name": name}), ctx)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_loss_falls_under_deepspeed(tiny_model, zero_stage):
    model, tok, fmt, cfg = tiny_model
    feats = _features(fmt, 16)
    tc = OmegaConf.merge(cfg.training, {"zero_stage": zero_stage, "epochs": 6, "micro_batch_size": 4, "lr": 3e-3})
    res = train(model, feats, _method(cfg, tok, fmt), tc, tok, seed=0)
    losses = [h["losses/task"] for h in res.history]
    assert res.steps == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_gradient_accumulation_equals_larger_batch(tiny_model):
    model, tok, fmt, cfg = tiny_model
    feats = _features(fmt, 8)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    base = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": 1, "lr": 1e-3, "max_grad_norm": 0.0})
    train(m1, feats, _method(cfg, tok, fmt), OmegaConf.merge(base, {"micro_batch_size": 4, "gradient_accumulation_steps": 2}), tok, seed=3)
    train(m2, feats, _method(cfg, tok, fmt), OmegaConf.merge(base, {"micro_batch_size": 8, "gradient_accumulation_steps": 1}), tok, seed=3)
    # One AdamW step at lr 1e-3: Adam divides each gradient entry by its own magnitude, so float
    # rounding of a ~0 gradient shows as up to ~1% of a step on a few entries (4 of 557696 on packed
    # batches, 1 on padded ones, on an AVX-512 host); a scale error would move most entries by O(lr).
    diff = torch.cat([(a - b).detach().abs().flatten() for a, b in zip(m1.parameters(), m2.parameters())])
    assert float((diff > 1e-6).float().mean()) < 1e-4 and float(diff.max()) < 5e-5
    moved = max(float((a - c).detach().abs().max()) for a, c in zip(m1.parameters(), model.parameters()))
    assert moved > 1e-4  # the step really changed the weights


def test_grad_norm_is_logged_and_is_the_norm_before_clipping(tiny_model):
    """ZeRO-0 fp32 DeepSpeed keeps no norm; the loop logs its own, taken before clipping."""
    model, tok, fmt, cfg = tiny_model
    feats = _features(fmt, 8)
    ref = copy.deepcopy(model)
    tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": 2, "micro_batch_size": 4, "lr": 1e-3,
                                        "max_grad_norm": 1e-3, "zero_stage": 0})
    res = train(model, feats, _method(cfg, tok, fmt), tc, tok, seed=5)
    assert all(h["grad_norm"] > 0 for h in res.history)
    from cwac.data.prompts import collate_train, pad_id
    from cwac.trainer import batch_order, grad_norm

    first = batch_order(len(feats), 1, 5)[:4]     # step 1's micro-batch
    ref.train()
    batch = collate_train([feats[i] for i in first], pad_id(tok))
    _method(cfg, tok, fmt).task_loss(ref, batch).backward()
    expected = grad_norm(list(ref.parameters()))
    assert expected > 1e-3   # so clipping (to 1e-3) really happened after the logged value was taken
    assert res.history[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)


class _Probe(Method):
    """Records the hook calls and doubles one parameter's gradient through grad_hooks."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.calls = {"after_step": 0, "replace_batch": 0}

    def grad_hooks(self, model):
        p = model.model.embed_tokens.weight
        return {p: lambda g: torch.zeros_like(g)}

    def replace_batch(self, batch, step):
        self.calls["replace_batch"] += 1
        return batch

    def compute_loss(self, model, batch, step):
        task = self.task_loss(model, batch)
        return LossOutput({"task": task, "extra": 0.0 * task}, {"probe": 1.0})

    def after_step(self, model, step):
        self.calls["after_step"] += 1
        return {"after": float(step)}


def test_hooks_fire_and_named_losses_are_logged(tiny_model):
    model, tok, fmt, cfg = tiny_model
    emb0 = model.model.embed_tokens.weight.detach().clone()
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None, stage="finetune", start_model_path="")
    m = _Probe(OmegaConf.create({"name": "probe"}), ctx)
    tc = OmegaConf.merge(cfg.training, {"epochs": 1, "micro_batch_size": 4, "gradient_accumulation_steps": 2})
    res = train(model, _features(fmt, 16), m, tc, tok, seed=0)
    assert res.steps == 2 and m.calls == {"after_step": 2, "replace_batch": 4}
    assert {"losses/task", "losses/extra", "losses/total", "metrics/probe", "metrics/after"} <= set(res.history[0])
    torch.testing.assert_close(model.model.embed_tokens.weight, emb0)  # its gradient was zeroed by the hook


def test_child_process_does_not_reuse_an_inherited_rendezvous_port(tiny_model):
    """A subprocess inherits our single-process rendezvous variables; it must pick its own port."""
    import os
    import subprocess
    import sys

    from cwac.trainer import init_distributed

    init_distributed()  # this process now holds MASTER_PORT
    code = "from cwac.trainer import init_distributed; print(init_distributed())"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(0, 1)" in r.stdout


def test_zero3_leaves_a_full_trained_module(tiny_model, tmp_path):
    """After ZeRO-3 training the module holds full, trained weights (not ZeRO's empty
    placeholders), runs without DeepSpeed's hooks, and saves complete tensors."""
    model, tok, fmt, cfg = tiny_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tc = OmegaConf.merge(cfg.training, {"zero_stage": 3, "epochs": 1, "micro_batch_size": 4, "lr": 3e-3})
    train(model, _features(fmt, 8), _method(cfg, tok, fmt), tc, tok, seed=0)
    moved = 0.0
    for n, p in model.named_parameters():
        assert p.shape == before[n].shape and p.numel() == before[n].numel(), n
        moved = max(moved, float((p.detach() - before[n]).abs().max()))
    assert moved > 1e-4
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # no ZeRO-3 hook is left to release (re-partition) the weights after a forward pass
    assert all(p.numel() == before[n].numel() for n, p in model.named_parameters())
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m" / "model.safetensors")
    for n, t in saved.items():
        assert t.numel() > 0, n


def test_deepspeed_extra_is_deep_merged_and_the_override_composes():
    """The documented offload override adds to ``zero_optimization`` instead of replacing it."""
    from cwac.trainer import deepspeed_config
    from cwac.utils import compose_config

    cfg = compose_config("model=tiny", "training.zero_stage=3",
                         "+training.deepspeed_extra={zero_optimization:{offload_optimizer:{device:cpu}},"
                         "zero_force_ds_cpu_optimizer:false}")
    ds = deepspeed_config(cfg.training)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch_size


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_response_loss_equals_full_logits_loss_and_skips_prompt_positions(tiny_model, reduction):
    """The LM head runs only where a response token is predicted; loss and gradients are unchanged."""
    from cwac.data.prompts import collate_train, pad_id
    from cwac.losses import response_loss, sequence_mean_ce

    model, tok, fmt, cfg = tiny_model
    batch = collate_train(_features(fmt, 4), pad_id(tok))
    m_full, m_kept = copy.deepcopy(model), copy.deepcopy(model)
    out = m_full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    full = sequence_mean_ce(out.logits, batch["labels"], reduction)
    rows: list[int] = []
    head = m_kept.get_output_embeddings()
    h = head.register_forward_hook(lambda mod, args, o: rows.append(args[0].shape[1]))
    kept = response_loss(m_kept, batch, reduction)
    h.remove()
    n_targets = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert rows == [n_targets] and n_targets < batch["input_ids"].shape[1]   # the head skipped the prompt positions
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    full.backward()
    kept.backward()
    for (n, a), b in zip(m_full.named_parameters(), m_kept.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("fused", [True, False])
def test_training_fused_adamw_selects_the_optimizer_kernel(tiny_model, monkeypatch, fused):
    model, tok, fmt, cfg = tiny_model
    seen = []
    real = torch.optim.AdamW

    def spy(*a, **kw):
        seen.append(kw.get("fused"))
        return real(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": 1, "micro_batch_size": 4, "fused_adamw": fused})
    train(model, _features(fmt, 4), _method(cfg, tok, fmt), tc, tok, seed=0)
    assert seen == [True if fused else None]
