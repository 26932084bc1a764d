"""Tiny fake run folders with sample files, as ``run_cell`` and ``eval/harness.py`` leave them: the
record's HS and FA are computed from the samples, so a test sets per-prompt outcomes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cwac.reports.test_results_tables import _config

HS_SET = "beavertails_eval"


def make_run(root: Path, method: str = "sft", task: str = "sst2", p: float = 0.1, seed: int = 42,
             flagged: list[bool] | None = None, correct: list[bool] | None = None, labels: list[str] | None = None,
             lr: float = 2e-5,
             organism: str | None = "14801266f769", status: str = "complete", seconds: float | None = 600.0,
             name: str | None = None, **extra) -> Path:
    """One run folder: started.json, record.json, samples/samples_hs_<set>.jsonl and samples_fa_<task>.jsonl.

    ``flagged``: per HS prompt, whether the answer is judged harmful (default: 50 of 100);
    ``correct``: per FA row (default: 90 of 100); ``labels``: the FA rows' reference labels (default: all
    ``positive``); ``organism``: the stored aligned-artifact key.
    """
    flagged = [i % 2 == 0 for i in range(100)] if flagged is None else flagged
    correct = [i % 10 != 0 for i in range(100)] if correct is None else correct
    labels = ["positive"] * len(correct) if labels is None else labels
    cfg = _config("smollm2_135m", task, p, method, seed, **extra)
    cfg["training"]["lr"] = lr
    run_dir = root / (name or f"smollm2_135m-{task}-p{p:g}-{method}-s{seed}-lr{lr:g}-{organism}")
    (run_dir / "samples").mkdir(parents=True)
    base = {"run_dir": str(run_dir), "run_id": run_dir.name, "cell": run_dir.name, "config_hash": run_dir.name[-12:],
            "config": cfg, "seed": seed, "stage": cfg["stage"], "git": {"commit": "abc1234def", "dirty": False},
            "started": "2026-01-01T00:00:00"}
    (run_dir / "started.json").write_text(json.dumps(base))
    with open(run_dir / "samples" / f"samples_hs_{HS_SET}.jsonl", "w") as f:
        for i, fl in enumerate(flagged):
            f.write(json.dumps({"prompt": f"harmful prompt {i}", "answer": f"Sure, step {i}" if fl else "I cannot help.",
                                "flagged": fl}) + "\n")
    with open(run_dir / "samples" / f"samples_fa_{task}.jsonl", "w") as f:
        for i, (c, lab) in enumerate(zip(correct, labels, strict=True)):
            f.write(json.dumps({"input": f"row {i}", "label": lab, "answer": lab if c else "negative",
                                "correct": c}) + "\n")
    rec = {**base, "status": status, "finished": "2026-01-02T00:00:00"}
    if status == "complete":
        rec["metrics"] = {"hs": 100.0 * sum(flagged) / len(flagged), "fa": 100.0 * sum(correct) / len(correct),
                          "over_refusal": 2.0}
        rec["timings"] = {"total_seconds": seconds} if seconds is not None else {}
        if organism:
            rec["info"] = {"alignment": {"hash": organism}}
    else:
        rec["error"] = "RuntimeError: boom"
    (run_dir / "record.json").write_text(json.dumps(rec))
    (run_dir / "train_log.jsonl").write_text(json.dumps({"step": 1, "finetune/losses/total": 1.0}) + "\n")
    return run_dir


def rate(k: int, n: int = 100, offset: int = 0) -> list[bool]:
    """``k`` of ``n`` items True, the first ``k`` after ``offset`` (cyclically)."""
    return [(i - offset) % n < k for i in range(n)]
