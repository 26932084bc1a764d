"""Cells running in parallel processes share offline artifacts (aligned model, CWAC subspace
and SAE, AsFT/SafeLoRA matrices): the first process builds under the file lock, the others
wait and reuse the finished folder, so an artifact is computed once per key."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

from cwac.artifacts import ArtifactStore

KEY = {"model": "m", "kind": "subspace", "eta": 0.99}


def _worker(root: str, barrier, log: str, out) -> None:
    barrier.wait()  # all processes ask at the same moment

    def build(tmp: Path) -> dict:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a slow build: the others must be blocked, not building too
        (tmp / "U.bin").write_bytes(b"x" * 1024)
        return {"builder": os.getpid()}

    path = ArtifactStore(root).get_or_build("cwac_subspace", KEY, build)
    out.put((os.getpid(), str(path), (path / "U.bin").stat().st_size, ArtifactStore.meta(path)["meta"]["builder"]))


def test_parallel_processes_build_an_artifact_once(tmp_path):
    ctx = mp.get_context("fork")
    n = 3
    barrier, out = ctx.Barrier(n), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "artifacts"), barrier, str(log), out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in range(n)]
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    builders = log.read_text().split()
    assert len(builders) == 1                                   # built exactly once
    assert {r[1] for r in results} == {str(ArtifactStore(tmp_path / "artifacts").path_for("cwac_subspace", KEY))}
    assert {r[2] for r in results} == {1024}                    # every process sees the complete artifact
    assert {r[3] for r in results} == {int(builders[0])}        # ... the one the builder wrote
    leftovers = [p.name for p in (tmp_path / "artifacts" / "cwac_subspace").iterdir() if "tmp" in p.name]
    assert leftovers == []
