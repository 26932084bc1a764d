"""Cells of one aligned-artifact key that started from different builds of it (``cwac.reports.builds``)."""

from __future__ import annotations

import json
from pathlib import Path

from cwac.reports.build import build
from cwac.reports.collect import build_of
from tests.cwac.reports.test_costs import HOST_A, write_align
from tests.cwac.reports.test_results_tables import write_run

ONE_THREAD = {**HOST_A, "torch_threads": 1}


def _started_from(run_dir: Path, artifact: str, host: dict, **meta) -> Path:
    """Give a record the ``info.alignment`` a cell copies from the artifact it started from."""
    rec = json.loads((run_dir / "record.json").read_text())
    rec["info"] = {"alignment": {"hash": artifact, "host": host, "created": meta.pop("created", "2026-01-01T00:00:00"),
                                 "meta": {"steps": 100, **meta}}}
    (run_dir / "record.json").write_text(json.dumps(rec))
    return run_dir


def test_a_build_is_named_by_its_losses_with_its_weights_digest_beside():
    rec = {"info": {"alignment": {"hash": "vac000000000", "meta": {"loss_first": 5.1104107, "loss_last": 1.6398716}}}}
    assert build_of(rec)["id"] == "losses 5.1104107 / 1.6398716" and build_of(rec)["weights"] is None
    rec["info"]["alignment"]["meta"]["weights_sha256"] = "ab" * 32
    assert build_of(rec) == {"artifact": "vac000000000", "id": "losses 5.1104107 / 1.6398716", "weights": "ab" * 6,
                             "host": None, "created": None}
    del rec["info"]["alignment"]["meta"]["loss_first"]
    assert build_of(rec)["id"] == "weights " + "ab" * 6
    assert build_of({"info": {}}) is None


def test_the_same_build_made_twice_one_with_a_digest_one_without_is_one_build(tmp_path):
    """The organism built twice at two threads on the AVX2 host repeated its losses exactly; the
    second build also recorded its weights' digest. Its cells and the first build's are one build."""
    runs = tmp_path / "runs"
    _started_from(write_run(runs, seed=42), "org000000000", HOST_A, loss_first=3.1750410, loss_last=0.9236852)
    _started_from(write_run(runs, seed=43), "org000000000", ONE_THREAD, loss_first=3.1750331, loss_last=0.9236994)
    _started_from(write_run(runs, seed=44), "org000000000", ONE_THREAD, loss_first=3.1750331, loss_last=0.9236994,
                  weights_sha256="f4" * 32)
    build([runs], tmp_path / "out", make_plots=False)
    rows = [ln for ln in (tmp_path / "out" / "tables" / "builds.md").read_text().splitlines() if ln.startswith("| `")]
    assert len(rows) == 2
    assert "losses 3.1750331 / 0.9236994; weights " + "f4" * 6 in rows[1] and "SFT: s43, s44 |" in rows[1]


def test_cells_of_one_key_from_two_builds_are_listed_with_each_builds_own_scores(tmp_path):
    runs, history = tmp_path / "runs", tmp_path / "history"
    for seed in (42, 43):
        _started_from(write_run(runs, method="vaccine", seed=seed), "vac000000000", HOST_A,
                      loss_first=5.1104107, loss_last=1.6398716, created="2026-01-01T00:00:00")
    _started_from(write_run(runs, method="vaccine", seed=44), "vac000000000", ONE_THREAD,
                  loss_first=5.1104112, loss_last=1.6240163, created="2026-01-02T00:00:00")
    for seed in (42, 43):   # every SFT cell from the one organism build: not listed
        _started_from(write_run(runs, seed=seed), "org000000000", HOST_A, loss_first=3.0, loss_last=0.9)
    # each build's own stage=align record: the first in the tables, the second kept out of them
    for root, host, hs, losses in ((runs, HOST_A, 3.0, (5.1104107, 1.6398716)), (history, ONE_THREAD, 3.5, (5.1104112, 1.6240163))):
        rec_dir = write_align(root, "vaccine", "vac000000000", host, train_seconds=4600.0, hs=hs, over_refusal=22.0)
        rec = json.loads((rec_dir / "record.json").read_text())
        rec["info"]["alignment"]["meta"].update({"loss_first": losses[0], "loss_last": losses[1]})
        (rec_dir / "record.json").write_text(json.dumps(rec))

    out = build([runs], tmp_path / "out", make_plots=False, references=[history])
    assert "builds" in out["costs"]
    rows = [ln for ln in (tmp_path / "out" / "tables" / "builds.md").read_text().splitlines() if ln.startswith("| `")]
    assert len(rows) == 2 and all("vac000000000" in r for r in rows)
    assert "losses 5.1104107 / 1.6398716" in rows[0] and "| 3.0 / 22 |" in rows[0] and "Vaccine: s42, s43 |" in rows[0]
    assert "(avx2, avx512f; 1 threads)" in rows[1] and "| 3.5 / 22 |" in rows[1] and "Vaccine: s44 |" in rows[1]
    assert "more than one build" in (tmp_path / "out" / "index.md").read_text()
    # the aligned table says how many of the key's cells started from the build it scores
    vac = next(ln for ln in (tmp_path / "out" / "tables" / "aligned.md").read_text().splitlines() if "| Vaccine |" in ln)
    assert vac.endswith("| 2 of 3 |")


def test_no_section_when_every_key_has_one_build(tmp_path):
    runs = tmp_path / "runs"
    for seed in (42, 43):
        _started_from(write_run(runs, seed=seed), "org000000000", HOST_A, loss_first=3.0, loss_last=0.9)
    out = build([runs], tmp_path / "out", make_plots=False)
    assert "builds" not in out["costs"] and not (tmp_path / "out" / "tables" / "builds.md").exists()


def test_a_build_made_again_on_a_fresh_machine_shows_its_first_date_and_how_often_it_was_made(tmp_path):
    """A fresh machine rebuilds the artifact; at the same ISA and thread count it repeats the losses,
    so its cells join the first build's row, which keeps the first build's date."""
    runs = tmp_path / "runs"
    _started_from(write_run(runs, seed=42), "org000000000", HOST_A, loss_first=3.0, loss_last=0.9,
                  created="2026-01-05T00:00:00")
    _started_from(write_run(runs, seed=43), "org000000000", HOST_A, loss_first=3.0, loss_last=0.9,
                  created="2026-01-01T00:00:00")
    _started_from(write_run(runs, seed=44), "org000000000", ONE_THREAD, loss_first=3.1, loss_last=0.8,
                  created="2026-01-03T00:00:00")
    build([runs], tmp_path / "out", make_plots=False)
    rows = [ln for ln in (tmp_path / "out" / "tables" / "builds.md").read_text().splitlines() if ln.startswith("| `")]
    assert len(rows) == 2
    assert "| 2026-01-01T00:00:00 (made 2 times) |" in rows[0] and "SFT: s42, s43 |" in rows[0]
    assert "| 2026-01-03T00:00:00 |" in rows[1] and "SFT: s44 |" in rows[1]
