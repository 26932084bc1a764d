"""``python -m results.build`` is the results builder itself, options and all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cwac.reports.build

ROOT = Path(__file__).resolve().parents[2]


def test_results_build_is_the_reports_builder():
    import results.build

    assert results.build.main is cwac.reports.build.main


def test_results_build_runs_as_a_module(tmp_path):
    missing = tmp_path / "missing"
    out = subprocess.run([sys.executable, "-m", "results.build", "--runs", str(missing)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
