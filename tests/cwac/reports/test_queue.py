"""The cell queue (sweeps/queue.md) on a two-cell queue: each cell's config hash is the one a
`python run.py <overrides>` launch computes, done / to run comes from the records, a cell shared by
a later section counts once, missing minutes are estimated from the records' times, and the
project's own queue composes."""

from __future__ import annotations

import json

import yaml

from cwac.records import config_hash
from cwac.reports.queue import QUEUE_YAML, build_queue, expand
from cwac.utils import compose_config

SFT = ["task=sst2", "harmful=p0.1", "seed=43", "method=sft"]
VACCINE = ["task=sst2", "harmful=p0.1", "seed=43", "method=vaccine", "method@alignment.method=vaccine"]
QUEUE = {"extra": {"vaccine": ["method@alignment.method=vaccine"]},
         "sections": [{"name": "main", "run": ["python run.py +sweep=main_cpu"],
                       "grid": {"task": ["sst2"], "harmful": ["p0.1"], "seed": [43], "method": ["sft", "vaccine"]}},
                      {"name": "lr", "grid": {"task": ["sst2"], "harmful": ["p0.1"], "seed": [43],
                                              "training.lr": [2.0e-05], "method": ["sft"]}},
                      {"name": "bad", "grid": {"task": ["no_such_task"], "method": ["sft"]}}]}


def _record(root, chash: str, seconds: float) -> None:
    d = root / f"cell-{chash[:8]}"
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps({"status": "complete", "config_hash": chash, "cell": "cell",
                                               "timings": {"total_seconds": seconds}}))


def test_two_cell_queue_status_hashes_and_minutes(tmp_path):
    q = tmp_path / "queue.yaml"
    q.write_text(yaml.safe_dump(QUEUE, sort_keys=False))
    sft_hash = config_hash(compose_config(*SFT))
    _record(tmp_path / "runs", sft_hash, 720.0)
    out = tmp_path / "queue.md"
    main, lr, bad = build_queue([tmp_path / "runs", tmp_path / "absent"], q, out)
    sft, vac = main.cells
    assert sft.overrides == SFT and vac.overrides == VACCINE          # the alignment-stage override comes along
    assert sft.chash == sft_hash and vac.chash == config_hash(compose_config(*VACCINE))   # as run.py computes it
    assert (sft.status, vac.status) == ("done", "to run")
    assert sft.minutes == 12.0 and vac.minutes == 12.0               # estimated from the same task's record
    (lr_cell,) = lr.cells                                            # training.lr=2e-05 is the main table's cell
    assert lr_cell.chash == sft_hash and lr_cell.first_in == 0 and lr_cell.status == "done"
    assert bad.cells[0].status == "does not compose" and "no_such_task" in bad.cells[0].error
    md = out.read_text()
    # the cell that does not compose yet is missing too, timed by every record (no record of its task)
    assert "**1 of 3 cells done; the 2 missing need about 24 min (~0.4 h)** (estimated" in md
    assert f"| 1 | done | 12.0 | `{sft_hash}` | `python run.py {' '.join(SFT)}` |" in md
    assert f"| 2 | to run | ~12 | `{vac.chash}` | `python run.py {' '.join(VACCINE)}` |" in md
    assert "| 1 | done, in section 1 |" in md
    assert "| 2 | lr | 0 (+1 shared) | 0 | 0 | 0 | 0 | 0 min |" in md


def test_project_queue_is_the_issue_order_and_composes():
    sections = expand(yaml.safe_load(QUEUE_YAML.read_text()))
    names = [s.name for s in sections]
    assert names[0].startswith("7.1 main table: SST-2") and names[1].startswith("7.4 ablation")
    assert [n.split(":")[0] for n in names[2:]] == ["7.1 main table", "7.1 main table", "7.3 ratio sweep",
                                                    "7.3 ratio sweep", "7.2 generalisation",
                                                    "learning-rate sensitivity", "Later defences (Booster, T-Vaccine, RepNoise, LDIFS, Antidote)",
                                                    "Later defences"]
    first = sections[0].cells
    assert len(first) == 24 and {c.method for c in first} == {"sft", "asft", "safeinstr", "sppft", "cwac", "lisa",
                                                             "safelora", "vaccine"}


def test_aligned_builds_the_missing_cells_wait_for(tmp_path):
    """The organism's build and each alignment-stage defence's that a missing cell names, with the cells
    waiting for each: timed by the build's own align record, else by the organism's build x align_cost."""
    q = tmp_path / "queue.yaml"
    q.write_text(yaml.safe_dump({**QUEUE, "align_cost": {"vaccine": 2}}, sort_keys=False))
    runs = tmp_path / "runs"
    organism = config_hash(compose_config("stage=align"))
    d = runs / "align"
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps({"status": "complete", "config_hash": organism, "cell": "align",
                                               "timings": {"total_seconds": 1800.0, "start_model_seconds": 1500.0}}))
    out = tmp_path / "queue.md"
    build_queue([runs], q, out)
    md = out.read_text()
    vaccine = config_hash(compose_config("stage=align", "method@alignment.method=vaccine"))
    assert "## Aligned builds the missing cells wait for" in md
    # 3 missing cells (sft, vaccine, the one that does not compose) start from the organism, 1 from Vaccine's
    assert f"| `python run.py stage=align` | yes | 30.0 | 3 | `{organism}` |" in md
    # 2 x the organism's 25-minute build + its 5 minutes of evaluation
    assert f"| `python run.py stage=align method@alignment.method=vaccine` | no | ~55 | 1 | `{vaccine}` |" in md
    assert "the builds take about 85 min (~1.4 h)" in md
    (d / "record.json").unlink()
    build_queue([runs], q, out)
    assert "| `python run.py stage=align method@alignment.method=vaccine` | no | – | 1 |" in out.read_text()
