"""Copy every complete record into the repository, so that the tables survive the runs folder.

    python -m cwac.reports.archive                        # runs/ -> results/records/
    python -m cwac.reports.archive --runs runs /scratch/runs --out results/records

For each run folder under the runs folders holding a ``complete`` record (fine-tuning and
alignment stage), writes ``<out>/<run folder name>/`` with ``record.json``, ``train_log.jsonl`` and
``samples/<name>.jsonl.gz`` (each sample file gzipped with a fixed timestamp, so the same samples
give the same bytes). Nothing else is copied: no weights, no W&B files, no lock, no history.

Idempotent: a folder whose record is byte-identical to the source is left alone; a record that
changed (a rerun replaced it) replaces the archived folder whole. Failed and unfinished runs are
not archived (relaunching the sweep reruns them). ``python -m cwac.reports.build`` reads the
archive beside ``runs/``, and a record in both counts once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cwac.records import RECORD
from cwac.reports.samples import sample_files

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT / "results" / "records"
TRAIN_LOG = "train_log.jsonl"
SKIP_PARTS = ("history", "rerun", "_hydra")   # superseded attempts, a rerun in progress, Hydra's logs


@dataclass
class ArchiveReport:
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # not complete (failed, unreadable)


def complete_run_dirs(roots: list[Path]):
    """Run folders under ``roots`` whose ``record.json`` says ``complete``."""
    for root in roots:
        for rec in sorted(Path(root).rglob(RECORD)):
            rel = rec.relative_to(root).parts[:-1]
            if any(p in SKIP_PARTS for p in rel):
                continue
            try:
                status = json.loads(rec.read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                status = None
            yield rec.parent, status == "complete"


def gzip_to(src: Path, dst: Path) -> None:
    """Gzip ``src`` into ``dst`` reproducibly (no file name, timestamp 0)."""
    with open(src, "rb") as f, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            shutil.copyfileobj(f, gz)


def archive_one(run_dir: Path, out: Path) -> bool:
    """Archive one complete run folder into ``out/<run folder name>``; False when already there."""
    dest = out / run_dir.name
    record = (run_dir / RECORD).read_bytes()
    if dest.is_dir() and (dest / RECORD).exists() and (dest / RECORD).read_bytes() == record:
        return False
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=out))
    try:
        if (run_dir / TRAIN_LOG).exists():
            shutil.copy2(run_dir / TRAIN_LOG, tmp / TRAIN_LOG)
        files = sample_files(run_dir)
        if files:
            (tmp / "samples").mkdir()
        for name, f in files.items():
            target = tmp / "samples" / f"{name}.jsonl.gz"
            if f.name.endswith(".gz"):
                shutil.copy2(f, target)
            else:
                gzip_to(f, target)
        (tmp / RECORD).write_bytes(record)     # last: a folder with a record is whole
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def archive(roots: list[Path], out: Path = ARCHIVE) -> ArchiveReport:
    """Archive every complete record under ``roots`` into ``out`` (see the module docstring)."""
    rep = ArchiveReport()
    out = Path(out)
    for run_dir, complete in complete_run_dirs([Path(r) for r in roots]):
        if run_dir.resolve().parent == out.resolve():   # the archive itself passed as a runs folder
            continue
        if not complete:
            rep.skipped.append(run_dir.name)
        elif archive_one(run_dir, out):
            rep.copied.append(run_dir.name)
        else:
            rep.unchanged.append(run_dir.name)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwac.reports.archive", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=[str(ROOT / "runs")], help="runs folders to read (recursively)")
    ap.add_argument("--out", default=str(ARCHIVE), help="archive folder (default: results/records/)")
    args = ap.parse_args(argv)
    for r in args.runs:
        if not Path(r).is_dir():
            ap.error(f"runs folder {r!r} does not exist; pass the folder the cells wrote (paths.runs)")
    rep = archive([Path(r) for r in args.runs], Path(args.out))
    print(f"archived {len(rep.copied)} records into {args.out} ({len(rep.unchanged)} already there, "
          f"{len(rep.skipped)} not complete and left out)")
    for name in rep.copied:
        print(f"  + {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
