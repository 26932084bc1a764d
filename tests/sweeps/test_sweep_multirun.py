"""Real multiruns of the tiny model through a versioned sweep (run.py as a user runs it):
a 2 x 2 sweep finishes; a relaunch skips complete cells and reruns killed and failed ones;
one failing cell does not stop the others and its failure is recorded; parallel cells
(joblib launcher) build a shared artifact once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["+sweep=ratio_cpu", "model=tiny", "budget=smoke", "logger=none", "method=sft", "eval.backend=hf"]


def launch(*overrides: str, runs: Path, artifacts: Path, timeout: int = 1200) -> subprocess.CompletedProcess:  # a hang guard, not a speed test
    cmd = [sys.executable, "run.py", *TINY, *overrides, f"paths.runs={runs}", f"paths.artifacts={artifacts}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def records(runs: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/record.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, artifacts_dir):
    """The 2 x 2 sweep (p in {0, 0.1} x seed in {1, 2}) run once for the module."""
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    r = launch("harmful=p0,p0.1", "seed=1,2", runs=runs, artifacts=artifacts_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs, r


def test_two_by_two_multirun_finishes(sweep):
    runs, r = sweep
    recs = records(runs)
    assert len(recs) == 4 and all(x["status"] == "complete" for x in recs.values())
    cells = {(x["config"]["harmful"]["ratio"], x["seed"]) for x in recs.values()}
    assert cells == {(0, 1), (0, 2), (0.1, 1), (0.1, 2)}
    assert {x["config"]["sweep_name"] for x in recs.values()} == {"ratio_cpu"}   # -> W&B group
    assert all(x["metrics"]["hs"] is not None for x in recs.values())
    index = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    assert len(index) == 4 and {row["status"] for row in index} == {"complete"}
    sweep_dirs = list((runs / "_hydra" / "ratio_cpu").iterdir())                   # table name in the path
    assert len(sweep_dirs) == 1 and (sweep_dirs[0] / "multirun.yaml").exists()


def test_relaunch_skips_complete_and_reruns_killed_and_failed(sweep, artifacts_dir):
    runs, _ = sweep
    by_cell = {x["cell"]: name for name, x in records(runs).items()}
    killed, failed = by_cell["tiny-sst2-p0-sft-s1"], by_cell["tiny-sst2-p0.1-sft-s2"]
    kept = sorted(set(by_cell.values()) - {killed, failed})
    before = {n: (runs / n / "record.json").read_bytes() for n in kept}
    (runs / killed / "record.json").unlink()                # killed: started.json but no record
    rec = json.loads((runs / failed / "record.json").read_text())
    rec.update(status="failed", error="RuntimeError: simulated crash")
    (runs / failed / "record.json").write_text(json.dumps(rec))
    assert (runs / killed / "started.json").exists()

    r = launch("harmful=p0,p0.1", "seed=1,2", runs=runs, artifacts=artifacts_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = records(runs)
    assert {n: (runs / n / "record.json").read_bytes() for n in kept} == before      # untouched
    assert after[killed]["status"] == after[failed]["status"] == "complete"          # rerun
    assert (r.stdout + r.stderr).count("complete record exists for this config") == 2
    index = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6 and {row["run_dir"] for row in index[4:]} == {str(runs / killed), str(runs / failed)}


def test_failing_cell_does_not_stop_the_sweep(tmp_path, artifacts_dir):
    # n_total=4000 at p=0.5 asks for 2000 harmful rows (the local source has 200): that cell
    # fails at data building; the next cell must still run.
    runs = tmp_path / "runs"
    r = launch("harmful=p0.5", "harmful.n_total=4000,40", "seed=1", runs=runs, artifacts=artifacts_dir)
    assert r.returncode != 0                                   # the sweep reports the failure at the end
    recs = {x["config"]["harmful"]["n_total"]: x for x in records(runs).values()}
    assert recs[40]["status"] == "complete"
    assert recs[4000]["status"] == "failed" and "2000 harmful rows" in recs[4000]["error"]
    assert "Traceback" in recs[4000]["traceback"]


def test_parallel_cells_build_a_shared_artifact_once(tmp_path):
    """Two cells at once (joblib launcher) on a fresh artifact store: the tiny model is built
    by one of them under the lock and reused by the other."""
    runs, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    r = launch("harmful=p0,p0.1", "seed=1", "threads=1", "hydra/launcher=local_parallel", runs=runs,
               artifacts=artifacts)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(records(runs)) == 2 and all(x["status"] == "complete" for x in records(runs).values())
    built = [p for p in (artifacts / "model_tiny").iterdir() if not p.name.endswith(".lock")]
    assert len(built) == 1 and (built[0] / "artifact.json").exists()
    logs = "".join(p.read_text() for p in (runs / "_hydra").rglob("*.log"))
    assert logs.count("building artifact model_tiny") == 1
    assert logs.count("reusing artifact model_tiny") == 1
    assert {x["info"]["start_model"] for x in records(runs).values()} == {str(built[0])}
