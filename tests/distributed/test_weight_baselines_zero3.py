"""AsFT (its penalty's gradient in hooks), Lisa (the proximal gradient in hooks, anchors taken in
them) and SafeLoRA (a post-training edit of gathered weights) under ZeRO-3 on 2 CPU ranks take the
same steps, and make the same edits, as one rank at ZeRO-0."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import assert_same_training, run_ranks, run_reference

pytestmark = pytest.mark.distributed

STEPS = ["training.micro_batch_size=2", "training.max_steps=3"]


def _base_checkpoint(tmp_path) -> str:
    """A pre-alignment reference for the tiny model: its weights with every linear map of the
    decoder moved (so V = W_aligned - W_base, and C, are non-zero everywhere)."""
    from cwac.artifacts import ArtifactStore
    from cwac.models import load_chat_model, resolve_model_path
    from tests.conftest import compose

    cfg = compose("model=tiny", "budget=smoke", artifacts=tmp_path / "artifacts", runs=tmp_path / "runs")
    model, tok, _ = load_chat_model(resolve_model_path(cfg.model, ArtifactStore(cfg.paths.artifacts)), cfg.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and n.endswith("proj.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_asft_zero3_matches_zero0(tmp_path):
    spec = {"method": "asft", "n_rows": 16, "base_model_path": _base_checkpoint(tmp_path),
            "overrides": ["method.lam=50.0", *STEPS]}
    ref = run_reference(spec, tmp_path)
    got = run_ranks(spec, tmp_path, zero_stage=3)
    assert_same_training(got, ref)
    held = [r["record_info"]["n_matrices_held"] for r in got.ranks]   # each rank holds its share of C / F and anchors
    assert [r["record_info"]["sharded_over_ranks"] for r in got.ranks] == [2, 2] and sum(held) == 14 and max(held) < 14
    pen = [[h["metrics/asft"] for h in r.ranks[0]["history"]] for r in (got, ref)]
    assert pen[1][0] == 0.0 and pen[1][-1] > 0   # the penalty acts after the first update
    torch.testing.assert_close(torch.tensor(pen[0]), torch.tensor(pen[1]), rtol=1e-3, atol=1e-9)


def test_lisa_zero3_matches_zero0(tmp_path):
    """Steps A, F, F: the anchor is retaken after the switch, inside the hooks of step 1."""
    spec = {"method": "lisa", "n_rows": 16,
            "overrides": ["method.align_steps=1", "method.finetune_steps=2", "method.rho=50.0",
                          "method.prox_off_fraction=0.0", *STEPS]}
    ref = run_reference(spec, tmp_path)
    got = run_ranks(spec, tmp_path, zero_stage=3)
    assert_same_training(got, ref)
    held = [r["record_info"]["n_anchors_held"] for r in got.ranks]   # each rank keeps its share of the anchors
    assert sum(held) == ref.ranks[0]["record_info"]["n_anchors_held"] and max(held) < sum(held)
    for run in (got, ref):
        h = run.ranks[0]["history"]
        assert [int(r["metrics/lisa_state"]) for r in h] == [1, 0, 0] and run.ranks[0]["record_info"]["switch_steps"] == [0]
        assert h[1]["metrics/lisa_drift_sq"] == 0.0 < h[2]["metrics/lisa_drift_sq"]   # anchor retaken at step 1
    drift = [[r["metrics/lisa_drift_sq"] for r in run.ranks[0]["history"]] for run in (got, ref)]
    torch.testing.assert_close(torch.tensor(drift[0]), torch.tensor(drift[1]), rtol=1e-3, atol=1e-12)


def test_safelora_zero3_matches_zero0(tmp_path):
    spec = {"method": "safelora", "n_rows": 16, "base_model_path": _base_checkpoint(tmp_path),
            "overrides": ["method.k=0.25", *STEPS]}
    ref = run_reference(spec, tmp_path)
    got = run_ranks(spec, tmp_path, zero_stage=3)
    info = [r.ranks[0]["record_info"] for r in (got, ref)]
    assert info[0]["projected"] == info[1]["projected"] and len(info[1]["projected"]) == 4   # 0.25 of 14
    assert all(r["record_info"]["projected"] == info[0]["projected"] for r in got.ranks)     # every rank agrees
    assert_same_training(got, ref)   # the projected weights included
