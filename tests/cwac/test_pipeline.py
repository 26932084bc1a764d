"""End-to-end cell on the tiny model: record contents, failure records, resume."""

from __future__ import annotations

import json
import os

import pytest

from cwac.experiment.cell import run_cell, run_dir_for


def test_sft_cell_writes_a_complete_self_describing_record(tiny_cfg):
    cfg = tiny_cfg("method=sft", "harmful=p0.1")
    rec = run_cell(cfg)
    run_dir = run_dir_for(cfg)
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["config_hash"] == rec["config_hash"]
    for key in ("config", "git", "packages", "host", "seed", "timings", "metrics", "started", "finished"):
        assert key in on_disk
    assert on_disk["host"]["cpus"] == os.cpu_count() and on_disk["host"]["torch_threads"] >= 1
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


def test_an_evaluation_count_larger_than_its_set_fails_before_training(tiny_cfg, monkeypatch):
    """harmbench_val has 41 prompts: asking for 100 must fail at once, naming the key and the fix,
    not after the build and the fine-tuning."""
    import cwac.trainer

    def no_training(*a, **k):
        raise AssertionError("training started before the evaluation counts were checked")

    monkeypatch.setattr(cwac.trainer, "train", no_training)
    cfg = tiny_cfg("method=sft", "eval.hs_sets=[harmbench_val]", "eval.hs_n=100")
    with pytest.raises(ValueError, match=r"eval.hs_n=100 but HS set 'harmbench_val' has 41 prompts.*eval.hs_n=null"):
        run_cell(cfg)
    rec = json.loads((run_dir_for(cfg) / "record.json").read_text())
    assert rec["status"] == "failed" and "eval.hs_n=100" in rec["error"]


def test_ranks_other_than_zero_train_but_neither_evaluate_nor_write(tiny_cfg, monkeypatch):
    """Under a multi-rank launcher only rank 0 evaluates, logs and writes the record."""
    import cwac.trainer
    import eval.harness

    cfg = tiny_cfg("method=sft", "harmful=p0.1", "logger=wandb")
    monkeypatch.setattr(cwac.trainer, "is_main_process", lambda: False)
    monkeypatch.setattr(eval.harness, "evaluate", lambda *a, **k: pytest.fail("rank 1 evaluated"))
    trained = []
    real_train = cwac.trainer.train
    monkeypatch.setattr(cwac.trainer, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    rec = run_cell(cfg)
    run_dir = run_dir_for(cfg)
    assert trained and rec["metrics"] == {}
    for name in ("record.json", "started.json", "train_log.jsonl", "samples", "wandb"):
        assert not (run_dir / name).exists(), name
    assert not (run_dir.parent / "index.jsonl").exists()


def test_first_aligned_build_under_several_ranks_fails_fast_instead_of_hanging(tiny_cfg, tmp_path, monkeypatch):
    from cwac.artifacts import ArtifactStore
    from cwac.experiment.align import start_model

    cfg = tiny_cfg("model.align=true", f"paths.artifacts={tmp_path / 'own'}")
    store = ArtifactStore(cfg.paths.artifacts)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="python run.py stage=align"):
        start_model(cfg, store)
    assert not (tmp_path / "own" / "aligned").exists() or not any((tmp_path / "own" / "aligned").iterdir())


def test_gpu_is_used_when_present_unless_deepspeed_is_pinned_to_the_cpu(tiny_cfg, monkeypatch):
    import torch

    from cwac.experiment.cell import setup_env
    from cwac.trainer import train_device

    cfg = tiny_cfg()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    setup_env(cfg)
    assert "DS_ACCELERATOR" not in __import__("os").environ      # DeepSpeed picks CUDA itself
    assert train_device() == torch.device("cuda", 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert train_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR")
    setup_env(cfg)
    assert __import__("os").environ["DS_ACCELERATOR"] == "cpu" and train_device() == torch.device("cpu")


def _fake_run(monkeypatch, hs=None, fail=None, calls=None):
    """Replace the model part of a cell (``cell._run``: load, train, evaluate) by a stub that writes
    a train log and a sample line into the folder it is given, then returns HS ``hs`` or raises."""
    import cwac.experiment.cell as cell

    def run(cfg, run_dir, logger, main, inputs):
        logger.log({"finetune/losses/total": 1.0}, step=1)
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "samples" / "samples_hs_x.jsonl").write_text(json.dumps({"hs": hs}) + "\n")
        if calls is not None:
            calls.append(str(run_dir))
        if fail:
            raise RuntimeError(fail)
        return {"metrics": {"hs": hs}, "info": {"n_rows": len(inputs.rows)}, "timings": {}}

    monkeypatch.setattr(cell, "_run", run)


def test_a_forced_rerun_never_loses_the_complete_record(tiny_cfg, monkeypatch):
    """skip_complete=false: the rerun works beside the record; a failure leaves the complete record
    (and its log and samples) in place, a success replaces it and keeps the old one in history/."""
    cfg = tiny_cfg()
    run_dir = run_dir_for(cfg)
    _fake_run(monkeypatch, hs=10.0)
    run_cell(cfg)
    good = (run_dir / "record.json").read_bytes()
    log, samples = (run_dir / "train_log.jsonl").read_text(), (run_dir / "samples" / "samples_hs_x.jsonl").read_text()

    _fake_run(monkeypatch, hs=99.0, fail="killed by the test")
    with pytest.raises(RuntimeError, match="killed by the test"):
        run_cell(tiny_cfg("skip_complete=false"))
    assert (run_dir / "record.json").read_bytes() == good
    assert (run_dir / "train_log.jsonl").read_text() == log
    assert (run_dir / "samples" / "samples_hs_x.jsonl").read_text() == samples
    failed = list(run_dir.glob("history/*-failed/record.failed.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["status"] == "failed"
    assert not (run_dir / "rerun").exists()

    _fake_run(monkeypatch, hs=20.0)
    run_cell(tiny_cfg("skip_complete=false"))
    assert json.loads((run_dir / "record.json").read_text())["metrics"]["hs"] == 20.0
    old = list(run_dir.glob("history/*-replaced/record.replaced.json"))
    assert len(old) == 1 and old[0].read_bytes() == good
    assert (old[0].parent / "train_log.jsonl").read_text() == log
    # the report builder reads record.json and started.json: one live run, nothing from history
    assert [p.parent for p in run_dir.rglob("record.json")] == [run_dir]
    assert [p.parent for p in run_dir.rglob("started.json")] == [run_dir]
    index = [json.loads(line) for line in (run_dir.parent / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["complete", "failed", "complete"]
    assert len({r["run_id"] for r in index}) == 3


def test_a_second_launch_of_a_running_cell_exits_and_touches_nothing(tiny_cfg, monkeypatch):
    from filelock import FileLock

    from cwac.experiment.cell import LOCK, CellBusy

    cfg = tiny_cfg()
    run_dir = run_dir_for(cfg)
    calls: list = []
    _fake_run(monkeypatch, hs=1.0, calls=calls)
    run_dir.mkdir(parents=True)
    (run_dir / "train_log.jsonl").write_text('{"step": 1}\n')   # the running launch's log
    with FileLock(str(run_dir / LOCK)):                          # the running launch
        with pytest.raises(CellBusy, match=r"already running in another process .*nothing was written"):
            run_cell(cfg)
    assert not calls and (run_dir / "train_log.jsonl").read_text() == '{"step": 1}\n'
    assert not (run_dir / "record.json").exists() and not (run_dir.parent / "index.jsonl").exists()
    run_cell(cfg)                                                # once it is gone, the cell runs
    assert len(calls) == 1


def test_the_index_holds_one_row_per_run(tmp_path):
    from cwac.records import write_record

    rec = {"run_dir": str(tmp_path), "run_id": "abc", "status": "complete", "metrics": {"hs": 1.0}}
    write_record(tmp_path, rec, tmp_path / "index.jsonl")
    write_record(tmp_path, rec, tmp_path / "index.jsonl")
    write_record(tmp_path, {**rec, "run_id": "def"}, tmp_path / "index.jsonl")
    assert [json.loads(x)["run_id"] for x in (tmp_path / "index.jsonl").read_text().splitlines()] == ["abc", "def"]


def test_a_record_is_reused_only_on_the_data_it_was_made_on(tiny_cfg, monkeypatch):
    """The record lists every data file the cell read with its sha256; when one differs now, the
    record is not reused (the cell reruns), whatever the config hash says."""
    cfg = tiny_cfg()
    run_dir = run_dir_for(cfg)
    calls: list = []
    _fake_run(monkeypatch, hs=1.0, calls=calls)
    run_cell(cfg)
    rec = json.loads((run_dir / "record.json").read_text())
    assert {"sst2/train.tsv", "sst2/dev.tsv", "beavertails_derived/train_merged_n1000_p0.2.json",
            "beavertails_derived/BeaverTails.json"} <= set(rec["data"]["files"])
    run_cell(cfg)
    assert len(calls) == 1                                    # same data: reused
    rec["data"]["files"]["sst2/train.tsv"] = "0" * 64          # made on another sst2/train.tsv
    (run_dir / "record.json").write_text(json.dumps(rec))
    run_cell(cfg)
    assert len(calls) == 2                                    # rerun
    from cwac.records import git_info, reuse_verdict

    rec = json.loads((run_dir / "record.json").read_text())
    del rec["data"]                                           # a record from before fingerprints
    for git, reused in (({**git_info(), "dirty": False}, True), ({**git_info(), "dirty": True}, False)):
        (run_dir / "record.json").write_text(json.dumps({**rec, "git": git}))
        assert reuse_verdict(run_dir, rec["config_hash"])[0] is reused


def test_a_committed_record_is_reused_on_a_fresh_machine(tiny_cfg, tmp_path, monkeypatch):
    """A complete record copied to ``paths.records/<run folder>`` (the repository's results/records)
    is reused when runs/ is empty, for the same config hash only; ``skip_complete=false`` reruns."""
    import shutil

    from cwac.experiment.cell import run_cell, run_dir_for

    calls: list[str] = []
    _fake_run(monkeypatch, hs=7.0, calls=calls)
    committed = tmp_path / "committed"
    cfg = tiny_cfg(f"paths.records={committed}")
    first = run_cell(cfg)
    run_dir = run_dir_for(cfg)
    shutil.copytree(run_dir, committed / run_dir.name)       # what `python -m cwac.reports.archive` keeps
    shutil.rmtree(run_dir)                                   # a fresh machine: runs/ is gone
    again = run_cell(cfg)
    assert len(calls) == 1 and again["run_id"] == first["run_id"]
    other = tiny_cfg(f"paths.records={committed}", "seed=7")     # another config hash: runs
    run_cell(other)
    assert len(calls) == 2
    run_cell(tiny_cfg(f"paths.records={committed}", "skip_complete=false"))
    assert len(calls) == 3
