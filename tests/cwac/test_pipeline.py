"""End-to-end cell on the tiny model: record contents, failure records, resume."""

from __future__ import annotations

import json

import pytest

from cwac.pipeline import run_cell, run_dir_for


def test_sft_cell_writes_a_complete_self_describing_record(tiny_cfg):
    cfg = tiny_cfg("method=sft", "harmful=p0.1")
    rec = run_cell(cfg)
    run_dir = run_dir_for(cfg)
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["config_hash"] == rec["config_hash"]
    for key in ("config", "git", "packages", "seed", "timings", "metrics", "started", "finished"):
        assert key in on_disk
    m = on_disk["metrics"]
    assert 0 <= m["hs"] <= 100 and 0 <= m["fa"] <= 100 and 0 <= m["over_refusal"] <= 100
    assert m["judge"]["name"] == "keyword" and m["backend"] == "hf"
    assert on_disk["config"]["method"]["name"] == "sft" and on_disk["info"]["harmful_rows"] == 4
    assert m["train_loss_last"] < m["train_loss_first"]
    samples = run_dir / "samples"
    hs_rows = [json.loads(line) for line in (samples / "samples_hs_beavertails_eval.jsonl").read_text().splitlines()]
    assert len(hs_rows) == 8 and {"prompt", "answer", "flagged"} <= set(hs_rows[0])
    assert (samples / "samples_fa_sst2.jsonl").exists() and (run_dir / "train_log.jsonl").exists()
    index = (run_dir.parent / "index.jsonl").read_text().splitlines()
    assert json.loads(index[-1])["status"] == "complete"
    # same config again: the complete record is reused, nothing reruns
    again = run_cell(cfg)
    assert again["finished"] == rec["finished"]


def test_crashed_run_never_looks_complete(tiny_cfg):
    cfg = tiny_cfg("method=sft", "harmful.n_total=5000")  # asks for 500 harmful rows, 200 exist
    with pytest.raises(Exception, match="has only 200"):
        run_cell(cfg)
    rec = json.loads((run_dir_for(cfg) / "record.json").read_text())
    assert rec["status"] == "failed" and "has only 200" in rec["error"] and "metrics" not in rec
