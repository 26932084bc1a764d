"""Run one training job under 2 CPU ranks and compare it with a single-rank ZeRO-0 reference.

A test describes a job as a ``spec`` (a JSON-able dict, read by ``tests/distributed/worker.py``):

* ``method``: the method's name (``conf/method/<name>.yaml``), ``stage``: ``finetune`` or ``align``;
* ``overrides``: Hydra overrides on top of ``model=tiny budget=smoke logger=none``;
* ``n_rows``: fine-tuning rows (the SST-2 mix at p = 0.25, seed 0);
* ``reference_overrides``: overrides of the reference run only (e.g. a per-rank batch of a
  regulariser's prompts scaled by ``world``, as the micro-batch is).

``run_ranks(spec, tmp, world=2, zero_stage=3)`` starts ``python -m torch.distributed.run
--nproc_per_node 2`` (gloo, ``DS_ACCELERATOR=cpu``) with a timeout; every rank trains its shard
of each global batch through ``cwac.trainer.fit`` and writes ``rank<r>.json`` (loss history, the
method's record info); rank 0 also writes the trained weights. ``run_reference(spec, tmp)`` runs
the same job in one process at ZeRO-0 with the per-rank micro-batch times ``world``, i.e. the
same global batches, so a test reads:

    ref = run_reference(spec, tmp)
    got = run_ranks(spec, tmp)
    assert_same_training(got, ref)       # losses per step and every trained weight, to tolerance

Both runs share ``tmp/artifacts`` (the tiny model and any method artifact are built once, by the
reference). The loss of a micro-batch is the mean over its rows (``loss_reduction=sequence``),
and DeepSpeed averages gradients over ranks, so the two runs take the same steps up to float
rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


@dataclass
class Run:
    ranks: list[dict]                 # rank r's JSON output, in rank order
    weights: dict[str, torch.Tensor]  # the trained weights (rank 0)
    weights0: dict[str, torch.Tensor]  # the start weights (rank 0)
    seconds: float                    # wall time of the launch

    @property
    def losses(self) -> list[float]:
        """The global batch's loss per step: the mean of the ranks' shard losses (each rank logs its own)."""
        per_rank = [[h["losses/total"] for h in r["history"]] for r in self.ranks]
        return [sum(v) / len(v) for v in zip(*per_rank)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CWAC_SELF_RENDEZVOUS")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def _launch(cmd: list[str], out: Path, world: int, timeout: float) -> Run:
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        raise AssertionError(f"{world}-rank run timed out after {timeout:.0f} s: {tail!r}") from None
    secs = time.time() - t
    if r.returncode != 0:
        err = r.stderr.split("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")[0]
        raise AssertionError(f"{world}-rank run failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{err[-8000:]}")
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(world)]
    return Run(ranks=ranks, weights=load_file(str(out / "weights.safetensors")),
               weights0=load_file(str(out / "weights0.safetensors")), seconds=secs)


def _write_spec(spec: dict, tmp: Path, name: str, **extra) -> tuple[Path, Path]:
    out = Path(tmp) / name
    out.mkdir(parents=True, exist_ok=True)
    full = {"artifacts": str(Path(tmp) / "artifacts"), "runs": str(Path(tmp) / "runs"), **spec, **extra,
            "out": str(out)}
    path = out / "spec.json"
    path.write_text(json.dumps(full, indent=1))
    return path, out


def run_ranks(spec: dict, tmp: Path, *, world: int = 2, zero_stage: int = 3, timeout: float = 900.0,
              overrides: tuple[str, ...] = (), tag: str = "") -> Run:
    """``spec`` trained by ``world`` CPU ranks (gloo) at ``zero_stage``; each rank's JSON, rank 0's weights.
    ``tag`` names the output folder when one ``tmp`` holds several runs (they share ``tmp/artifacts``,
    which the reference built: ranks that start together on an empty store would build the tiny
    model concurrently)."""
    ov = [*spec.get("overrides", []), f"training.zero_stage={zero_stage}", *overrides]
    if zero_stage == 3:   # partition every parameter of the tiny model (DeepSpeed keeps < 1e5 elements whole)
        ov.append("++training.deepspeed_extra.zero_optimization.stage3_param_persistence_threshold=0")
    path, out = _write_spec(spec, tmp, f"z{zero_stage}_w{world}{tag}", overrides=ov)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(path)]
    return _launch(cmd, out, world, timeout)


def run_reference(spec: dict, tmp: Path, *, world: int = 2, timeout: float = 900.0) -> Run:
    """``spec`` in one process at ZeRO-0 on the same global batches as ``run_ranks(spec, world=world)``
    (micro-batch x ``world``)."""
    from tests.conftest import compose

    mb = compose("model=tiny", "budget=smoke", f"method={spec.get('method', 'sft')}",
                 *spec.get("overrides", [])).training.micro_batch_size
    ov = [*spec.get("overrides", []), "training.zero_stage=0", f"training.micro_batch_size={mb * world}",
          *spec.get("reference_overrides", [])]
    path, out = _write_spec(spec, tmp, "reference", overrides=ov)
    return _launch([sys.executable, str(WORKER), str(path)], out, 1, timeout)


def assert_same_training(got: Run, ref: Run, *, rtol: float = 1e-4, atol: float = 1e-4,
                         skip: tuple[str, ...] = ()) -> None:
    """Same loss at every step and the same trained weights (names in ``skip`` excepted).

    ``atol`` on the weights is 1e-4: AdamW normalises each coordinate's step, so a gradient
    coordinate near zero turns float-rounding differences between the two reductions into
    differences of up to ~lr x steps; the tests train 3-4 steps at lr 1e-3, so the weights move by
    ~3e-3, 30x the tolerance."""
    assert len(got.losses) == len(ref.losses) > 0
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=rtol, atol=atol)
    assert set(got.weights) == set(ref.weights)
    moved = max(float((w - ref.weights0[n]).abs().max()) for n, w in ref.weights.items())
    assert moved > 10 * atol, f"the weights hardly moved ({moved:.2e}), so agreeing to {atol} says little"
    for name, w in ref.weights.items():
        if name not in skip:
            torch.testing.assert_close(got.weights[name], w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
