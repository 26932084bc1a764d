"""benchmarks/cwac_overhead.py times an alignment-stage defence's own alignment step (what its aligned
artifact costs a step) against the organism's alignment step, in one process, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_alignment_stage_defences_train_their_own_loss_in_the_alignment_stage(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cwac_overhead.py"), "--model", "tiny",
                        "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1",
                        "--configs", "align,align_booster,align_repnoise", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((tmp_path / "cwac_overhead_tiny.json").read_text())
    ran = {n: c["ran"] for n, c in d["configs"].items()}
    assert ran == {"align": "align:sft", "align_booster": "align:booster", "align_repnoise": "align:repnoise"}
    ratio = d["align_defence_vs_align"]
    assert set(ratio) == {"align_booster", "align_repnoise"} and all(r > 0 for r in ratio.values())
    # the ratios are timings (no bound asserted here): the organism's are in results/benchmarks/align_defences
