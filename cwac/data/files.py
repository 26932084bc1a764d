"""Reading the project's ``data/`` folder: checksums and strict readers.

Every reader names the file and row of a malformed record, so a broken data file is a
one-line fix instead of a silent change of results.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from cwac.utils import file_sha256

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"


class DataError(ValueError):
    """A data file is missing, corrupted or malformed (the message says which and how to fix)."""


@lru_cache(maxsize=1)
def _manifest() -> dict[str, str]:
    path = DATA_ROOT / "MANIFEST.json"
    if not path.exists():
        raise DataError(f"{path} is missing; restore it from git (it lists the sha256 of every data file)")
    return json.loads(path.read_text())


_verified: set[str] = set()


def data_path(rel: str, root: Path | None = None, verify: bool = True) -> Path:
    """Absolute path of ``data/<rel>``; verifies its sha256 against MANIFEST.json once.

    A different ``root`` (a user's own copy) skips the checksum.
    """
    base = root or DATA_ROOT
    path = base / rel
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path in the config (relative to {base})")
    if verify and root is None and rel not in _verified:
        expected = _manifest().get(rel)
        if expected is None:
            raise DataError(f"data file {rel} is not listed in {DATA_ROOT / 'MANIFEST.json'}; add its sha256 there")
        got = file_sha256(path)
        if got != expected:
            raise DataError(f"data file {path} has sha256 {got}, expected {expected}: it was modified or corrupted; restore it from git")
        _verified.add(rel)
    return path


def _require(row: dict, keys: list[str], path: Path, idx: int) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{path}, row {idx}: expected an object with keys {keys}, got {type(row).__name__}")
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise DataError(f"{path}, row {idx}: missing field(s) {missing} (present: {sorted(row)})")


def read_json_list(path: Path, keys: list[str]) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected a JSON list of objects with {keys}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        _require(row, keys, path, i)
    return rows


def read_jsonl(path: Path, keys: list[str]) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i + 1}: not valid JSON ({e})") from None
            _require(row, keys, path, i + 1)
            rows.append(row)
    return rows


def read_csv(path: Path, keys: list[str], header: bool = True, delimiter: str = ",",
             fieldnames: list[str] | None = None) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, fieldnames=fieldnames,
                                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        rows = []
        for row in reader:
            line = reader.line_num   # the record's last physical line (quoted fields can span lines)
            if None in row:  # more fields than the header
                raise DataError(f"{path}, line {line}: too many fields ({row[None]!r} left over)")
            _require(row, keys, path, line)
            rows.append(row)
    return rows
