"""Resumable training under 2 ranks at ZeRO-3 (cwac.resume): every rank saves its shards, a run
killed after a checkpoint goes on from it, and it ends where the uninterrupted run ends."""

from __future__ import annotations

import pytest

from cwac.resume import LATEST
from tests.distributed.harness import assert_same_training, run_ranks, run_reference

pytestmark = pytest.mark.distributed

SPEC = {"method": "sft", "n_rows": 16, "overrides": ["training.micro_batch_size=2", "training.max_steps=4",
                                                     "training.lr_schedule=linear", "training.checkpoint_minutes=1e-9"]}


def test_zero3_two_ranks_resume_onto_the_uninterrupted_run(tmp_path):
    run_reference(SPEC, tmp_path)   # builds the tiny model once, before the ranks start together
    straight = run_ranks(SPEC, tmp_path, zero_stage=3, tag="_straight")
    folder = tmp_path / "resume"
    with pytest.raises(AssertionError, match="rc"):
        run_ranks({**SPEC, "resume_dir": str(folder), "kill_after": 2}, tmp_path, zero_stage=3, tag="_killed")
    assert (folder / LATEST).read_text().strip() == "2"
    assert sorted(p.name for p in folder.glob("state-2-rank*.pt")) == ["state-2-rank0.pt", "state-2-rank1.pt"]
    got = run_ranks({**SPEC, "resume_dir": str(folder)}, tmp_path, zero_stage=3, tag="_resumed")
    assert [r["resumed_from"] for r in got.ranks] == [2, 2] and straight.ranks[0]["resumed_from"] is None
    assert_same_training(got, straight, rtol=0, atol=0)   # the same layout: the same floats
    assert not folder.exists()
