"""The harness itself: plain SFT under 2 ranks at ZeRO-3 takes the same steps as one rank at ZeRO-0."""

from __future__ import annotations

import pytest

from tests.distributed.harness import assert_same_training, run_ranks, run_reference

pytestmark = pytest.mark.distributed

SFT = {"method": "sft", "n_rows": 16, "overrides": ["training.micro_batch_size=2", "training.max_steps=3"]}


def test_sft_zero3_two_ranks_matches_zero0(tmp_path):
    ref = run_reference(SFT, tmp_path)
    got = run_ranks(SFT, tmp_path, zero_stage=3)
    assert [r["world"] for r in got.ranks] == [2, 2] and ref.ranks[0]["world"] == 1
    assert got.ranks[0]["steps"] == ref.ranks[0]["steps"] == 3
    assert_same_training(got, ref)
    print(f"reference {ref.seconds:.1f} s, 2 ranks {got.seconds:.1f} s")
