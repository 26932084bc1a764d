"""Padding-free (packed) batches: the same loss and gradients as the padded batch, attention kept
within each example, and every method either trains on them or says why not."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from cwac.data.mix import build_finetune_mix
from cwac.data.prompts import batch_rows, collate_packed, collate_train
from cwac.losses import response_loss


def _smollm2_shaped(n_layers: int = 2) -> LlamaForCausalLM:
    """SmolLM2-135M's architecture (its config values) cut to ``n_layers``, random-initialised."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    return LlamaForCausalLM(cfg).eval()


def _random_features(n: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = int(torch.randint(5, 40, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _loss_and_grads(model, batch, reduction):
    model.zero_grad(set_to_none=True)
    loss = response_loss(model, batch, reduction)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_equivalent(model, feats, reduction):
    padded, packed = collate_train(feats, 0), collate_packed(feats)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    assert batch_rows(packed) == batch_rows(padded) == len(feats)
    l1, g1 = _loss_and_grads(model, padded, reduction)
    l2, g2 = _loss_and_grads(model, packed, reduction)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_packed_equals_padded_on_the_tiny_model(tiny_model, reduction):
    model, tok, fmt, _ = tiny_model
    feats = [fmt.train_features(e, 96) for e in build_finetune_mix("sst2", 8, 0.25, seed=0)][:6]
    assert len({len(f["input_ids"]) for f in feats}) > 1   # rows of different lengths: real padding
    _assert_equivalent(model.float(), feats, reduction)


def test_packed_equals_padded_on_a_smollm2_architecture():
    model = _smollm2_shaped()
    _assert_equivalent(model, _random_features(4, model.config.vocab_size), "sequence")


def test_no_example_attends_to_another_in_the_pack():
    """Changing one example's tokens leaves the other examples' logits unchanged (block-causal)."""
    model = _smollm2_shaped(1)
    feats = _random_features(3, model.config.vocab_size, seed=1)
    other = [feats[0], {"input_ids": [7] * len(feats[1]["input_ids"]), "labels": feats[1]["labels"]}, feats[2]]
    with torch.no_grad():
        from cwac.losses import model_inputs

        a = model(**model_inputs(collate_packed(feats))).logits
        b = model(**model_inputs(collate_packed(other))).logits
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    torch.testing.assert_close(a[:, :n0], b[:, :n0])             # before the changed example
    torch.testing.assert_close(a[:, n0 + n1:], b[:, n0 + n1:])   # after it
    assert not torch.allclose(a[:, n0:n0 + n1], b[:, n0:n0 + n1])


def test_the_loop_records_packing_and_a_method_that_cannot_falls_back(tiny_model):
    from cwac.api import TrainContext
    from cwac.experiment.plugins import get_method
    from cwac.trainer import packing_plan

    model, tok, fmt, cfg = tiny_model
    assert cfg.training.packing   # the smoke (and CPU) presets pack
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=None, stage="align",
                                   start_model_path="")
    base = OmegaConf.create({"name": "vaccine", "rho": 2.0, "norm": "batch"})
    assert packing_plan(cfg.training, get_method("vaccine")(base, ctx)) == \
        {"requested": True, "used": True, "fallback_reason": None}
    per_example = get_method("vaccine")(OmegaConf.merge(base, {"norm": "example"}), ctx)
    plan = packing_plan(cfg.training, per_example)
    assert plan["requested"] and not plan["used"] and "per-example" in plan["fallback_reason"]
    off = OmegaConf.merge(cfg.training, {"packing": False})
    assert packing_plan(off, get_method("sft")(OmegaConf.create({"name": "sft"}), ctx))["used"] is False


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cwac_regulariser_packed_with_a_shared_prefix_equals_the_padded_batch(pooling):
    """The packed regulariser batch (shared template start once, no padding) gives the padded batch's
    pooled latents and their gradients; and it really holds the prefix once."""
    from cwac.constraints.activations import make_batch, make_packed_batch
    from cwac.constraints.sae import batch_latents

    model = _smollm2_shaped(2)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 1000, (12,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 1000, (int(n),), generator=g).tolist() for n in (5, 17, 9, 30)]
    w = torch.randn(576, 8, generator=g)
    fn = lambda h: torch.relu(h @ w)   # noqa: E731  (a stand-in for the SAE's latents)
    padded = make_batch(prompts, pad=0, skip_tokens=4)
    packed = make_packed_batch(prompts, prefix=len(prefix), skip_tokens=4)
    assert packed.input_ids.shape[1] == len(prefix) + sum(len(p) - len(prefix) for p in prompts)
    out = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        z = batch_latents(model, 1, batch, fn, pooling, early_exit=True)
        z.pow(2).sum().backward()
        out.append((z.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    assert out[0][1].keys() == out[1][1].keys()
    for n, grad in out[0][1].items():   # float rounding only: relative to each gradient's norm
        assert float((out[1][1][n] - grad).norm() / grad.norm().clamp_min(1e-12)) < 1e-5, n
