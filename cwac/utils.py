"""Small helpers shared across the package: seeding, hashing, atomic writes, offline env."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cwac.host_allocator import current_host_allocator

# Variables that keep every library off the network and out of the home directory.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """The project's config (``conf/config.yaml``) with Hydra ``overrides``, outside ``run.py``
    (tools, benchmarks, the results builder, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stable_hash(obj: Any, length: int = 12) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; shared runs/artifacts folders need the umask's mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, and the dotted paths of
    those values: strict JSON has no NaN, and ``json.dumps`` would write a bare ``NaN``."""
    bad: list[str] = []

    def walk(o, at):
        if isinstance(o, float) and not math.isfinite(o):
            bad.append(at or "<value>")
            return None
        if isinstance(o, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(o)]
        return o

    return walk(obj, where), bad


def strict_json(obj: Any, **kw) -> str:
    """Strict JSON text of ``obj``: non-finite floats become null, and a dict that held any gets
    a ``"nonfinite"`` list naming them (so a null is never mistaken for a missing value)."""
    safe, bad = json_safe(obj)
    if bad and isinstance(safe, dict):
        safe = {**safe, "nonfinite": bad}
    return json.dumps(safe, allow_nan=False, default=str, **kw)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=False) + "\n")


def share_modes(root: str | Path) -> None:
    """Give every file and folder under ``root`` the mode the umask asks for (0644 / 0755 under
    umask 022). Some writers (``save_pretrained``'s safetensors, ``mkstemp``) make files 0600,
    which other users of a shared ``CWAC_ARTIFACTS`` or runs folder could not read."""
    mask = _umask()
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def normalize_prompt(text: str) -> str:
    """Whitespace- and case-normalised text, used to test prompt-set disjointness."""
    return " ".join(text.lower().split())


# CPU features that move a step's time by up to 2x on the 2-core hosts (AVX-512 and its bf16/VNNI
# forms, AMX); a timing is only comparable between records that list the same ones.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(CPU model name, flag set) from the text of Linux's /proc/cpuinfo (first processor)."""
    cpu, flags = None, set()
    for line in text.splitlines():
        key, _, val = (part.strip() for part in line.partition(":"))
        if key == "model name" and cpu is None:
            cpu = val
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
    return cpu, flags


def cpu_clock() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds the whole host has spent busy, CPU seconds of this process), read
    now from Linux's ``/proc/stat``; ``None`` elsewhere. Two readings give ``other_cores``."""
    try:
        head = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(head) < 9 or head[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in head[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, time.process_time()


def other_cores(start: tuple | None, end: tuple | None) -> float | None:
    """How many cores, on average, processes other than this one kept busy between two
    ``cpu_clock`` readings: ~0 for a cell alone on the host, ~1 beside one single-threaded cell.

    Step times are only comparable between cells that shared the host alike: at one torch thread
    on the AVX2-only host, the plain-SFT steps of SafeLoRA and Vaccine cells took 4.80 and 3.08 s
    (results/tables/step_cost.md), a gap their records could not explain. Every record now carries
    this beside its timings (``timings.other_cores``; the alignment build's in its artifact meta)."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, others / (end[0] - start[0])), 2)


def host_info() -> dict:
    """What ran this: CPU model, cores, the ISA flags above, torch threads and the GPU, if any.

    Stored in every run record, artifact meta and benchmark JSON beside their timings, since the
    same code trained 1.8-1.9x slower per token on an AVX2-only host than on the AVX-512 one of
    docs/environment.md (docs/organism.md, "Targets and hosts")."""
    try:
        cpu, flags = cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        cpu, flags = None, set()
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "isa": [f for f in ISA_FLAGS if f in flags], "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "host_allocator": current_host_allocator(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
