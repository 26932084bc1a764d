"""The archive of complete records (results/records/): what is copied (record, train log, gzipped
samples; never weights), idempotence, replacement of a changed record, and the builder reading
runs/ and the archive together with every record counted once and samples read from .gz."""

from __future__ import annotations

import gzip
import json

from cwac.reports.archive import archive, main
from cwac.reports.build import build
from cwac.reports.collect import load_results
from cwac.reports.samples import hs_rows, read_samples
from tests.cwac.reports.fake_runs import make_run, rate


def _runs(root):
    a = make_run(root, method="sft", seed=42, flagged=rate(70))
    b = make_run(root, method="cwac", seed=42, flagged=rate(10))
    (a / "model").mkdir()
    (a / "model" / "model.safetensors").write_bytes(b"weights")                 # never archived
    (a / "wandb").mkdir()
    (a / "wandb" / "run.wandb").write_text("w")
    (a / "running.lock").write_text("")
    make_run(root, method="asft", seed=42, status="failed")                     # not complete: left out
    killed = root / "smollm2_135m-sst2-p0.1-lisa-s42-00000000"
    killed.mkdir()
    (killed / "started.json").write_text(json.dumps({"cell": "lisa"}))
    align = make_run(root, method="sft", seed=42, stage="align", name="align-smollm2_135m-sft-s42-12345678")
    return a, b, align


def test_archive_copies_complete_records_with_gzipped_samples_only(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "records"
    a, b, align = _runs(runs)
    rep = archive([runs], out)
    assert sorted(rep.copied) == sorted([a.name, b.name, align.name]) and len(rep.skipped) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([a.name, b.name, align.name])
    files = sorted(str(p.relative_to(out / a.name)) for p in (out / a.name).rglob("*") if p.is_file())
    assert files == ["record.json", "samples/samples_fa_sst2.jsonl.gz", "samples/samples_hs_beavertails_eval.jsonl.gz",
                     "train_log.jsonl"]
    assert (out / a.name / "record.json").read_bytes() == (a / "record.json").read_bytes()
    with gzip.open(out / a.name / "samples" / "samples_hs_beavertails_eval.jsonl.gz", "rt") as f:
        assert f.read() == (a / "samples" / "samples_hs_beavertails_eval.jsonl").read_text()
    # the same rows whether read from the run folder or the archive
    assert hs_rows(out / a.name) == hs_rows(a)
    assert read_samples(out / a.name, "samples_fa_sst2") == read_samples(a, "samples_fa_sst2")


def test_archive_is_idempotent_and_replaces_a_changed_record(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "records"
    a, b, _ = _runs(runs)
    archive([runs], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rep = archive([runs], out)
    assert not rep.copied and len(rep.unchanged) == 3
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before     # byte-identical (gzip mtime 0)
    rec = json.loads((a / "record.json").read_text())                              # a rerun replaced the record
    rec["metrics"]["hs"] = 1.0
    (a / "record.json").write_text(json.dumps(rec))
    (a / "samples" / "samples_fa_sst2.jsonl").unlink()
    assert archive([runs], out).copied == [a.name]
    assert json.loads((out / a.name / "record.json").read_text())["metrics"]["hs"] == 1.0
    assert not (out / a.name / "samples" / "samples_fa_sst2.jsonl.gz").exists()   # replaced whole


def test_builder_reads_runs_and_archive_once_with_samples_from_gz(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "records"
    _runs(runs)
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    assert "archived 3 records" in capsys.readouterr().out
    results, cov = load_results([runs, out])
    assert cov.complete == 2 and not cov.duplicates and cov.skipped_stage == 1    # each record once
    archived_only, _ = load_results([out])
    assert len(archived_only) == 2
    res = build([out], tmp_path / "results", make_plots=False)
    claims = (tmp_path / "results" / "claims.md").read_text()
    # the paired bootstrap read the archived .gz samples: 100 paired prompts, not the metric alone
    assert "| SST-2: SFT | +60.0 [" in claims and "| 100 | holds |" in claims
    assert res["n_results"] == 2
