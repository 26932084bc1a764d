"""Reading the project's ``data/`` folder: checksums and strict readers.

Every reader names the file and line of a malformed record (a missing field, or blank text
where text is required), so a broken data file is a one-line fix instead of a silent change of
results. The files a process has read, with their checksums, are its data fingerprint.
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


#: every data file read in this process (``data/<rel>`` -> its sha256): a cell's data fingerprint
_verified: dict[str, str] = {}


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
        _verified[rel] = got
    return path


def data_fingerprint() -> dict[str, str]:
    """``data/<rel>`` -> sha256 of every data file this process has read. Stored in each run
    record, it covers every file the cell read (a superset when one process runs several cells,
    since readers cache), so that a record is only reused on the data it was made on."""
    return dict(sorted(_verified.items()))


def changed_data_files(fingerprint: dict[str, str]) -> list[str]:
    """The files of a recorded ``fingerprint`` whose content is not the same now (or that are gone)."""
    changed = []
    for rel, sha in fingerprint.items():
        path = DATA_ROOT / rel
        if not path.is_file() or file_sha256(path) != sha:
            changed.append(rel)
    return changed


def row_problem(row, keys: list[str], nonempty=(), check=None) -> str | None:
    """What is wrong with ``row``, or None: a field of ``keys`` missing or null, blank text in a
    field of ``nonempty``, or what the reader's own ``check(row)`` returns (a label out of range)."""
    if not isinstance(row, dict):
        return f"expected an object with keys {keys}, got {type(row).__name__}"
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        present = sorted(k for k in row if k is not None and row[k] is not None)
        return f"missing or null field(s) {missing} (fields present: {present})"
    empty = [k for k in nonempty if not str(row[k]).strip()]
    if empty:
        return (f"empty text in field(s) {empty}; fill it in or delete the row (then put the file's new "
                f"sha256 in {DATA_ROOT / 'MANIFEST.json'})")
    return check(row) if check is not None else None


def _require(row: dict, keys: list[str], path: Path, line: int, nonempty=(), check=None) -> None:
    problem = row_problem(row, keys, nonempty, check)
    if problem:
        raise DataError(f"{path}, line {line}: {problem}")


def json_list_lines(text: str) -> list[int]:
    """The 1-based line on which each item of the JSON list ``text`` starts."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    starts: list[int] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return starts
        starts.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)


def json_item_line(path: Path, idx: int) -> int:
    """The line on which item ``idx`` (0-based) of the JSON list in ``path`` starts."""
    return json_list_lines(path.read_text())[idx]


def read_json_list(path: Path, keys: list[str], nonempty=(), check=None) -> list[dict]:
    text = path.read_text()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected a JSON list of objects with {keys}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        problem = row_problem(row, keys, nonempty, check)
        if problem:
            raise DataError(f"{path}, line {json_list_lines(text)[i]} (item {i + 1} of the list): {problem}")
    return rows


def read_jsonl(path: Path, keys: list[str], nonempty=(), check=None) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i + 1}: not valid JSON ({e})") from None
            _require(row, keys, path, i + 1, nonempty, check)
            rows.append(row)
    return rows


def read_csv(path: Path, keys: list[str], header: bool = True, delimiter: str = ",",
             fieldnames: list[str] | None = None, nonempty=(), check=None) -> list[dict]:
    """Rows of a CSV/TSV file; ``keys`` must be present, ``nonempty`` fields must hold text and
    ``check(row)`` (a problem string or None) must pass, else a DataError naming the line."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, fieldnames=fieldnames,
                                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        rows = []
        for row in reader:
            line = reader.line_num   # the record's last physical line (quoted fields can span lines)
            if None in row:  # more fields than the header
                raise DataError(f"{path}, line {line}: too many fields ({row[None]!r} left over)")
            _require(row, keys, path, line, nonempty, check)
            rows.append(row)
    return rows
