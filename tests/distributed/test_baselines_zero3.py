"""SPPFT (a frozen band of layers) and Vaccine (perturbations added by forward hooks on the
attention outputs, a gradient pass taken with ``torch.autograd.grad``) under ZeRO-3 on 2 CPU
ranks take the same steps as one rank at ZeRO-0."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import assert_same_training, run_ranks, run_reference

pytestmark = pytest.mark.distributed

STEPS = ["training.micro_batch_size=2", "training.max_steps=3"]


def test_sppft_zero3_matches_zero0(tmp_path):
    spec = {"method": "sppft", "n_rows": 16, "overrides": ["method.band=[0,0]", *STEPS]}
    ref = run_reference(spec, tmp_path)
    got = run_ranks(spec, tmp_path, zero_stage=3)
    assert got.ranks[0]["record_info"]["band"] == [0, 0]
    assert any(n.startswith("model.layers.0.") for n in got.ranks[0]["zero3_partitioned"])
    assert_same_training(got, ref)
    for name, w in got.weights.items():   # the band is frozen, the rest trained
        moved = float((w - got.weights0[name]).abs().max())
        assert (moved == 0.0) == name.startswith("model.layers.0."), (name, moved)
    print(f"sppft: reference {ref.seconds:.1f} s, 2 ranks {got.seconds:.1f} s")


def test_vaccine_zero3_matches_zero0(tmp_path):
    """Alignment stage; ``norm: example`` makes the perturbation independent of how rows are split
    into micro-batches, so 2 ranks x 2 rows equal 1 rank x 4 rows exactly."""
    spec = {"method": "vaccine", "stage": "align", "n_rows": 16,
            "overrides": ["method.norm=example", "method.rho=2.0", *STEPS]}
    ref = run_reference(spec, tmp_path)
    got = run_ranks(spec, tmp_path, zero_stage=3)
    assert_same_training(got, ref)
    for run in (got, ref):
        h = run.ranks[0]["history"]
        assert all(r["metrics/vaccine_eps_norm"] > 0 for r in h)
        # the perturbed loss (trained) is above the clean one (ascent direction)
        assert all(r["losses/task"] > r["metrics/vaccine_loss_unperturbed"] for r in h)
    # per example ||eps|| = rho, so a micro-batch of b rows has ||eps|| = rho sqrt(b)
    eps = torch.tensor([r["metrics/vaccine_eps_norm"] for r in got.ranks[0]["history"]])
    torch.testing.assert_close(eps, torch.full_like(eps, 2.0 * 2 ** 0.5), rtol=1e-4, atol=1e-4)
    print(f"vaccine: reference {ref.seconds:.1f} s, 2 ranks {got.seconds:.1f} s")
