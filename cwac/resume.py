"""Resumable training: the loop's checkpoints, so that a killed run goes on from its last one.

An alignment-stage defence on the CPU organism trains for hours (Booster ~2.5 h, RepNoise ~4 h at
two threads: ``results/benchmarks/align_defences/``), longer than a machine may be held, and a
paper-scale cell on GPUs for hours too. Every ``training.checkpoint_minutes`` the loop saves,
into the folder its caller names (``resume_dir``):

* the DeepSpeed engine's checkpoint: weights, optimizer and learning-rate scheduler
  (``engine.save_checkpoint``, so every ZeRO stage saves its own shards);
* ``state-<step>-rank<r>.pt``: where the loop is (step, position in the batch order, the history
  rows so far, training seconds so far), the global RNG streams (torch, CUDA, Python, NumPy) and
  the method's own step-to-step state (``Method.step_state``: its batch cursors and RNG streams);
* ``LATEST``: the step of the newest complete checkpoint, written last and atomically, so a kill
  while saving leaves the previous checkpoint in force. Older checkpoints are then removed.

A later run of the same thing (the same artifact key or run folder) loads the checkpoint and
continues; on one host at one thread count it ends on the very floats of an uninterrupted run
(``tests/cwac/test_resume.py``). On another ISA or thread count it continues too, but its floats are
that mix's (docs/organism.md, "One key, two builds"), so every process appends a segment (first step,
host, torch threads) to the loop state and the result carries them (``TrainResult.segments``). A checkpoint is used only when its fingerprint matches: the planned
steps, the rows, the seed, the world size, the method and a digest of the project's training code
(``code_digest``), so that no model is trained half by one version of the code and half by another.
A mismatch is logged and the run starts over. The folder is removed once training completes.

A method whose state is not declared on its own class (``step_state``) trains without
checkpoints: a resumed run could not continue its batch cursors or RNG streams exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cwac.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

LATEST = "LATEST"
_ROOT = Path(__file__).resolve().parents[1]
_CODE = ("cwac", "baselines")   # what trains; eval/ does not change a step
_NOT_TRAINING = ("cwac/reports", "cwac/plan")   # tables and the memory planner: never imported by a step


def code_digest(root: Path = _ROOT) -> str:
    """sha256 over the Python files of the training code (``cwac/`` but its reports and memory
    planner, ``baselines/``), in path order."""
    h = hashlib.sha256()
    for pkg in _CODE:
        for f in sorted((root / pkg).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if not rel.startswith(_NOT_TRAINING):
                h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def declared_step_state(method) -> tuple[str, ...] | None:
    """The names of ``method``'s step-to-step state, as its own class declares them
    (``Method.step_state``); None when the class itself declares nothing (a subclass does not
    inherit its parent's declaration: it may hold state the parent does not)."""
    names = type(method).__dict__.get("step_state")
    return None if names is None else tuple(names)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _method_state(method, names) -> dict:
    out = {}
    for n in names:
        if not hasattr(method, n):   # e.g. an alignment-stage defence fine-tuning (plain SFT) never builds its stream
            continue
        v = getattr(method, n)
        out[n] = ("torch.Generator", v.get_state()) if isinstance(v, torch.Generator) else v
    return out


def _set_method_state(method, state: dict) -> None:
    for n, v in state.items():
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "torch.Generator":
            getattr(method, n).set_state(v[1])
        else:
            setattr(method, n, v)


class Checkpointer:
    """Saves and loads the loop's checkpoints in ``folder`` (None or ``minutes`` 0: never)."""

    def __init__(self, folder: str | Path | None, minutes: float, method, fingerprint: dict,
                 rank: int = 0, world: int = 1):
        self.folder = Path(folder) if folder else None
        self.seconds = float(minutes or 0) * 60
        self.method, self.rank, self.world = method, rank, world
        self.names = declared_step_state(method)
        self.fingerprint = {**fingerprint, "world": world, "method": type(method).__name__, "code": code_digest()}
        self.enabled = self.folder is not None and self.seconds > 0 and self.names is not None
        if self.folder is not None and self.seconds > 0 and self.names is None:
            log.info("training without checkpoints: %s does not declare its step-to-step state "
                        "(Method.step_state on its own class), so a killed run restarts from step 0",
                        type(method).__name__)
        self.last_save = time.time()

    def _barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def latest(self) -> int | None:
        f = self.folder / LATEST if self.folder else None
        return int(f.read_text().strip()) if f is not None and f.exists() else None

    def load(self, engine) -> dict | None:
        """The loop state of the newest checkpoint (weights, optimizer, scheduler, RNG streams and the
        method's state restored), or None when there is none or it belongs to another run."""
        if not self.enabled:
            return None
        step = self.latest()
        if step is None:
            return None
        state = torch.load(self.folder / f"state-{step}-rank{self.rank}.pt", weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k])
            log.warning("not resuming from %s (step %d): it was saved by another run (%s differ); starting over",
                        self.folder, step, ", ".join(diff))
            self._barrier()
            if self.rank == 0:
                shutil.rmtree(self.folder, ignore_errors=True)
            return None
        engine.load_checkpoint(str(self.folder / "ds"), tag=f"step{step}")
        _set_rng_state(state["rng"])
        _set_method_state(self.method, state["method"])
        log.info("resuming from %s at step %d of %d", self.folder, step, self.fingerprint["steps"])
        self.last_save = time.time()
        return state["loop"]

    def maybe_save(self, engine, loop: dict) -> bool:
        """Save a checkpoint after optimizer step ``loop['step']`` when ``minutes`` have passed since
        the last one (every rank decides alike: rank 0's clock, broadcast)."""
        if not self.enabled or loop["step"] >= self.fingerprint["steps"]:
            return False
        # on the engine's device: NCCL broadcasts only CUDA tensors
        dev = engine.device if engine.device is not None else next(engine.module.parameters()).device
        due = torch.tensor([float(time.time() - self.last_save >= self.seconds)], device=dev)
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast(due, 0)
        if not due.item():
            return False
        self.save(engine, loop)
        return True

    def save(self, engine, loop: dict) -> None:
        step = int(loop["step"])
        t = time.time()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._barrier()
        engine.save_checkpoint(str(self.folder / "ds"), tag=f"step{step}", save_latest=False)
        state = {"fingerprint": self.fingerprint, "loop": loop, "rng": _rng_state(),
                 "method": _method_state(self.method, self.names)}
        tmp = self.folder / f".state-{step}-rank{self.rank}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.folder / f"state-{step}-rank{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            old = self.latest()
            atomic_write_text(self.folder / LATEST, f"{step}\n")   # the new checkpoint is in force from here
            atomic_write_json(self.folder / "fingerprint.json", {**self.fingerprint, "step": step})
            if old is not None and old != step:
                shutil.rmtree(self.folder / "ds" / f"step{old}", ignore_errors=True)
                for f in self.folder.glob(f"state-{old}-rank*.pt"):
                    f.unlink(missing_ok=True)
        self._barrier()
        self.last_save = time.time()
        log.info("checkpoint at step %d saved in %.1f s (%s)", step, time.time() - t, self.folder)

    def finish(self) -> None:
        """Training completed: its checkpoints are no longer needed."""
        if self.folder is not None and self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
