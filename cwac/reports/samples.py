"""A run's generations (``samples/*.jsonl``, written by the evaluation), read the same way whether
they lie in the run folder as written or gzipped in the committed archive (``*.jsonl.gz``,
``python -m cwac.reports.archive``).

File stems: ``samples_hs_<set>`` (HS prompts, each row with the judge's ``flagged``),
``samples_harmless`` (over-refusal) and ``samples_fa_<task>`` (each row with ``correct``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SUFFIXES = (".jsonl", ".jsonl.gz")


def stem(path: Path) -> str:
    """``samples_hs_x.jsonl.gz`` -> ``samples_hs_x``."""
    name = path.name
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return name[: -len(s)]
    return path.stem


def sample_files(run_dir: str | Path) -> dict[str, Path]:
    """{stem: file} under ``<run_dir>/samples``; a plain ``.jsonl`` wins over its ``.gz`` copy."""
    d = Path(run_dir) / "samples"
    out: dict[str, Path] = {}
    if not d.is_dir():
        return out
    for suffix in (".jsonl.gz", ".jsonl"):     # .gz first, so that a plain .jsonl replaces it
        for f in sorted(d.glob(f"*{suffix}")):
            out[stem(f)] = f
    return out


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file; a half-written last line (a killed run) is skipped."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_samples(run_dir: str | Path, name: str) -> list[dict] | None:
    """Rows of the sample file ``name`` (a stem, e.g. ``samples_fa_sst2``), or None when absent."""
    f = sample_files(run_dir).get(name)
    return None if f is None else read_rows(f)


def hs_rows(run_dir: str | Path) -> dict[str, list[dict]] | None:
    """{HS set: rows} of every ``samples_hs_<set>`` file, or None when the run kept none."""
    out = {s[len("samples_hs_"):]: read_rows(f) for s, f in sample_files(run_dir).items() if s.startswith("samples_hs_")}
    return out or None


def fa_rows(run_dir: str | Path, task: str) -> list[dict] | None:
    return read_samples(run_dir, f"samples_fa_{task}")
