"""Offline artifacts (converted models, the aligned organism, subspaces, SAEs, matrices).

An artifact is a folder keyed by ``kind`` and the hash of the config that determines it.
It is built once, into a temporary folder, under a file lock, and renamed into place
only when complete; a second process waiting on the lock then reuses it. A changed
config gives a new hash and a rebuild. Nothing half-written is ever visible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from cwac.utils import atomic_write_json, host_info, share_modes, stable_hash

log = logging.getLogger(__name__)
META = "artifact.json"


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / stable_hash(key)

    def resume_dir(self, kind: str, key: dict[str, Any]) -> Path:
        """Where the build of (kind, key) keeps its training checkpoints until it completes
        (``cwac.resume``): beside the artifact, outside its temporary build folder, so that a
        killed build's successor finds them."""
        final = self.path_for(kind, key)
        return final.parent / f".{final.name}.resume"

    def exists(self, kind: str, key: dict[str, Any]) -> bool:
        return (self.path_for(kind, key) / META).exists()

    def get_or_build(self, kind: str, key: dict[str, Any], build: Callable[[Path], dict | None]) -> Path:
        """Return the folder of artifact (kind, key), building it with ``build(tmp_dir)`` if needed.

        ``build`` writes its files into ``tmp_dir`` and may return metadata to store.
        """
        final = self.path_for(kind, key)
        if (final / META).exists():
            log.info("reusing artifact %s at %s", kind, final)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / META).exists():  # built by another process while we waited
                log.info("reusing artifact %s at %s (built concurrently)", kind, final)
                return final
            if final.exists():  # a folder without metadata is a leftover; never use it
                shutil.rmtree(final)
            # We hold the lock, so any other build folder of this artifact is a killed builder's.
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            log.info("building artifact %s -> %s", kind, final)
            t0 = time.time()
            try:
                meta = build(tmp) or {}
                atomic_write_json(tmp / META, {"kind": kind, "hash": final.name, "key": key,
                                               "build_seconds": round(time.time() - t0, 2), "host": host_info(),
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "meta": meta})
                share_modes(tmp)   # safetensors weights are written 0600; a shared store needs the umask's mode
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final

    @staticmethod
    def meta(path: str | Path) -> dict:
        return json.loads((Path(path) / META).read_text())
