"""benchmarks/gpu_step.py runs on the CPU in its tiny form (the GPU run is the same code with
``--device cuda --shape llama3_8b``) and writes, per method, a peak, a step time and the plan's
prediction for the same layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_step_tiny_on_cpu_writes_peaks_times_and_the_plan(tmp_path):
    out = tmp_path / "gpu_step.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--shape", "tiny",
                        "--steps", "2", "--warmup", "1", "--methods", "sft,cwac,asft", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["preset"] == "training/deepspeed=zero3_offload" and d["failed"] == {}
    rows = {r["method"]: r for r in d["methods"]}
    assert set(rows) == {"sft", "cwac", "asft"}
    for r in rows.values():
        assert r["steps"] == 3 and r["timed_steps"] == 1 and r["seconds_per_step"] > 0
        assert r["peak_bytes"] > 0 and r["predicted_gib"] > 0 and "ZeRO-3" in r["plan_layout"]
