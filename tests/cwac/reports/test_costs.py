"""The cost tables: each aligned artifact's own scores and its build over the organism's on the same
host, and each method's fine-tuning step over SFT's on the same host (``cwac.reports.costs``)."""

from __future__ import annotations

import json
from pathlib import Path

from cwac.reports.build import build
from cwac.reports.organism import computed_key
from tests.cwac.reports.test_results_tables import write_run

HOST_A = {"cpu": "AMD EPYC", "isa": ["avx2", "avx512f"], "torch_threads": 2, "gpu": None}
HOST_B = {"cpu": "AMD EPYC", "isa": ["avx2"], "torch_threads": 2, "gpu": None}


def write_align(root: Path, method: str, artifact: str | None, host: dict, train_seconds: float, hs: float = 4.0,
                over_refusal: float = 7.0, finished: str = "2026-01-01T00:00:00") -> Path:
    """An align record as ``python run.py stage=align`` leaves it: the artifact's meta in ``info.alignment``.
    ``artifact=None``: the plain organism's key, as the cells compute it."""
    run_dir = write_run(root, method="sft", align_method=method, stage="align", hs=hs, fa=6.0, host=host,
                        finished=finished)
    rec = json.loads((run_dir / "record.json").read_text())
    rec["config"]["model"].update({"source": "gguf", "prompt_format": "chat", "system_prompt": None})
    rec["config"]["alignment"]["training"] = {"epochs": 2, "max_len": 80}
    artifact = artifact or computed_key(rec["config"])
    rec["metrics"].update({"over_refusal": over_refusal, "hs_by_set": {"beavertails_eval": hs + 1, "harmbench_test": hs - 1}})
    rec["info"] = {"alignment": {"hash": artifact, "build_seconds": train_seconds + 10.0, "host": host,
                                 "meta": {"steps": 100, "train_seconds": train_seconds}}}
    (run_dir / "record.json").write_text(json.dumps(rec))
    return run_dir


def _rows(path: Path, start: str = "| SmolLM2") -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.startswith(start)]


def test_aligned_table_gives_each_artifacts_scores_and_its_build_over_the_organisms_on_the_same_host(tmp_path):
    runs, history = tmp_path / "runs", tmp_path / "history"
    write_align(runs, "sft", None, HOST_A, train_seconds=700.0)                   # 7.00 s/step
    write_align(runs, "vaccine", "vac000000000", HOST_A, train_seconds=1400.0, hs=3.0, over_refusal=23.0)
    write_align(runs, "booster", "boo000000000", HOST_B, train_seconds=1500.0)              # no organism on B here
    write_run(runs)                                                                          # a fine-tuning cell

    build([runs], tmp_path / "out", make_plots=False)
    rows = _rows(tmp_path / "out" / "tables" / "aligned.md")
    assert len(rows) == 3 and "SFT (the organism's recipe)" in rows[0]
    vac = next(r for r in rows if "| Vaccine |" in r)
    assert "| `vac000000000` | 3.0 | beavertails_eval 4.0, harmbench_test 2.0 | 23.0 | 6.0 (SST-2) | 1410.0 | 100 | 14.00 | 2.00 |" in vac
    assert "| 15.00 | – | AMD EPYC (avx2; 2 threads) |" in next(r for r in rows if "| Booster |" in r)

    # an organism built on host B, kept out of the tables (history), becomes Booster's denominator
    write_align(history, "sft", None, HOST_B, train_seconds=500.0)
    build([runs], tmp_path / "out2", make_plots=False, references=[history])
    rows = _rows(tmp_path / "out2" / "tables" / "aligned.md")
    assert len(rows) == 3                                                                    # never a row itself
    assert "| 15.00 | 3.00 | AMD EPYC (avx2; 2 threads) |" in next(r for r in rows if "| Booster |" in r)
    assert "### Aligned artifacts, before fine-tuning" in (tmp_path / "out2" / "index.md").read_text()


def test_step_cost_is_the_median_over_sfts_median_on_the_same_host(tmp_path):
    runs, history = tmp_path / "runs", tmp_path / "history"
    for seed, sps, busy in ((42, 4.0, 0.0), (43, 6.0, 1.0), (44, 5.5, None)):                # None: an older record
        write_run(runs, seed=seed, host=HOST_A, timings={"seconds_per_step": sps, "other_cores": busy})  # SFT median 5.5
    write_run(runs, method="cwac", host=HOST_A, timings={"seconds_per_step": 8.8, "other_cores": 0.96})
    write_run(runs, method="cwac", p=0.2, host=HOST_A, timings={"seconds_per_step": 50.0})  # not the main ratio
    write_run(runs, method="asft", host=HOST_B, timings={"seconds_per_step": 9.0})          # no SFT on B

    build([runs], tmp_path / "out", make_plots=False)
    rows = _rows(tmp_path / "out" / "tables" / "step_cost.md")
    assert len(rows) == 3
    assert "| SFT | AMD EPYC (avx2, avx512f; 2 threads) | 3 | 5.50 | 1.00 | 0.5 |" in rows[0]   # median of 0.0, 1.0
    assert "| CWAC | AMD EPYC (avx2, avx512f; 2 threads) | 1 | 8.80 | 1.60 | 1.0 |" in rows[1]
    assert "| AsFT | AMD EPYC (avx2; 2 threads) | 1 | 9.00 | – | – |" in rows[2]

    write_run(history, host=HOST_B, timings={"seconds_per_step": 3.0})                      # SFT on B, out of the tables
    write_run(history, method="asft", host=HOST_B, timings={"seconds_per_step": 1.0})       # not a denominator
    build([runs], tmp_path / "out2", make_plots=False, references=[history])
    rows = _rows(tmp_path / "out2" / "tables" / "step_cost.md")
    assert len(rows) == 3 and "| AsFT | AMD EPYC (avx2; 2 threads) | 1 | 9.00 | 3.00 | – |" in rows[2]
