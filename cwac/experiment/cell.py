"""One experiment cell, end to end: seed -> start model -> method -> data -> fit -> evaluate
-> record. ``run.py`` is a thin Hydra wrapper around ``run_cell``.

Stages (``stage=``):
  * ``finetune`` (default): fine-tune the (aligned) model on the poisoned task mix with a method.
  * ``align``: build (or reuse) the aligned model artifact and evaluate it (no fine-tuning).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from cwac.api import TrainContext
from cwac.artifacts import ArtifactStore
from cwac.data.files import data_fingerprint
from cwac.host_allocator import set_host_allocator
from cwac.experiment.align import alignment_log, start_model
from cwac.experiment.plugins import get_method
from cwac.experiment.preflight import Inputs, build_judge, check_inputs, check_judge, check_settings
from cwac.models import load_chat_model
from cwac.records import (RECORD, config_hash, git_info, is_complete, now, package_versions, read_record,
                          resolved, reuse_verdict, write_record)
from cwac.utils import OFFLINE_ENV, atomic_write_json, host_info, seed_everything
from eval.factory import build_backend
from eval.harness import evaluate

log = logging.getLogger(__name__)
LOCK = "running.lock"   # held by the process running the cell (``run_lock``)
RERUN = "rerun"         # where a rerun beside a complete record works until it succeeds


def cell_name(cfg: DictConfig) -> str:
    if cfg.stage == "align":
        return f"align-{cfg.model.name}-{cfg.alignment.method.name}-s{cfg.seed}"
    return f"{cfg.model.name}-{cfg.task.name}-p{cfg.harmful.ratio:g}-{cfg.method.name}-s{cfg.seed}"


def run_dir_for(cfg: DictConfig) -> Path:
    return Path(cfg.paths.runs) / f"{cell_name(cfg)}-{config_hash(cfg)[:8]}"


def setup_env(cfg: DictConfig) -> None:
    """Offline by default; a user who wants the hub sets ``offline=false``."""
    if cfg.offline:
        for k, v in OFFLINE_ENV.items():
            os.environ.setdefault(k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():   # DeepSpeed's CPU accelerator (gloo); on a GPU it picks CUDA itself
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    set_host_allocator(cfg.host_allocator)   # speed only (cwac/host_allocator.py)


def apply_lora(model, lcfg: DictConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                            target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM"))


def _evaluate(cfg, model, tok, fmt, run_dir: Path, task: str | None) -> dict:
    judge = build_judge(cfg)
    # eval.backend = hf | vllm | auto; vllm saves the model to <run_dir>/model (removed by close()).
    backend = build_backend(cfg.eval, model, tok, fmt, run_dir, dtype=cfg.model.dtype, seed=cfg.seed)
    try:
        metrics = evaluate(backend, judge, cfg.eval, task, run_dir / "samples", cfg.judge.threshold,
                           task_source=cfg.task.source)
    finally:
        backend.close()
    metrics["backend"] = backend.name
    metrics["backend_info"] = backend.describe()
    metrics["judge"] = judge.describe()
    return metrics


class CellBusy(RuntimeError):
    """Another process is running the same cell (it holds the run folder's lock)."""


@contextmanager
def run_lock(run_dir: Path, cell: str, main: bool):
    """Hold ``<run_dir>/running.lock`` while the cell runs (rank 0 only): a second launch of a
    running cell exits at once with ``CellBusy`` and touches nothing. The OS drops the lock of a
    killed process, so a relaunch after a kill runs."""
    if not main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise CellBusy(f"cell {cell} is already running in another process (it holds {run_dir / LOCK}); "
                       "nothing was written. Wait for it to finish, then launch again to reuse its record") from None
    try:
        yield
    finally:
        lock.release()


def run_cell(cfg: DictConfig) -> dict:
    """Run one cell and return its record (or the existing complete record when resuming).

    Every setting is checked before anything is written (``preflight``), and every data file
    the cell trains and evaluates on before any model loads. A record is reused only for the same
    config hash and data (``reuse_verdict``). A rerun beside a complete record works in
    ``<run_dir>/rerun/`` and replaces the record only when it succeeds (the old one is kept under
    ``history/``); one launch at a time runs a cell (``run_lock``).
    """
    check_settings(cfg)
    setup_env(cfg)
    check_judge(cfg)
    chash = config_hash(cfg)
    run_dir = run_dir_for(cfg)
    from cwac.trainer import is_main_process

    # Under a multi-rank launcher every rank trains its shard; only rank 0 logs, evaluates and
    # writes (the others would duplicate train_log lines, W&B runs and the whole evaluation).
    main = is_main_process()
    if cfg.skip_complete:
        reuse, why = reuse_verdict(run_dir, chash)
        if reuse:
            log.info("complete record exists for this config at %s; skipping (skip_complete=false reruns)", run_dir)
            return read_record(run_dir)  # type: ignore[return-value]
        if (run_dir / RECORD).exists():
            log.info("not reusing the record at %s: %s; running the cell", run_dir, why)
        committed = committed_record(cfg, run_dir.name, chash)
        if committed is not None:
            return committed
    with run_lock(run_dir, cell_name(cfg), main):
        if cfg.skip_complete and is_complete(run_dir, chash):   # finished by another launch meanwhile
            log.info("complete record exists for this config at %s; skipping (skip_complete=false reruns)", run_dir)
            return read_record(run_dir)  # type: ignore[return-value]
        return _attempt(cfg, run_dir, chash, main)


def committed_record(cfg: DictConfig, name: str, chash: str) -> dict | None:
    """The committed copy of this fine-tuning cell's complete record (``paths.records/<run folder>``,
    written by ``python -m cwac.reports.archive``) when it is for the same config hash and data, else
    None. Alignment-stage records are never taken from there: that stage's job is to build the
    aligned artifact on this machine."""
    if cfg.stage != "finetune" or not cfg.paths.get("records"):
        return None
    folder = Path(cfg.paths.records) / name
    if not (folder / RECORD).exists():
        return None
    reuse, why = reuse_verdict(folder, chash)
    if not reuse:
        log.info("not reusing the committed record at %s: %s", folder, why)
        return None
    log.info("a committed complete record exists for this config at %s; skipping (skip_complete=false or "
             "paths.records=/nonexistent reruns)", folder)
    return read_record(folder)


def _prepare_attempt(run_dir: Path) -> Path:
    """The folder this attempt writes into: the run folder, or ``<run_dir>/rerun`` when the run
    folder holds a complete record, which stays in place until the rerun succeeds."""
    shutil.rmtree(run_dir / RERUN, ignore_errors=True)   # a killed rerun's leftovers
    prior = read_record(run_dir)
    if prior and prior.get("status") == "complete":
        (run_dir / RERUN).mkdir()
        log.info("a complete record exists at %s; this run works in %s and replaces it only if it succeeds",
                 run_dir, run_dir / RERUN)
        return run_dir / RERUN
    for stale in ("record.json", "train_log.jsonl"):   # a crashed, killed or failed attempt: start clean
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


def _archive_name(name: str, tag: str) -> str:
    """History keeps files under names the report builder does not take for a live run."""
    return f"{name[:-len('.json')]}.{tag}.json" if name in (RECORD, "started.json") else name


def _history_dir(run_dir: Path, stamp: str | None, tag: str) -> Path:
    base = f"{(stamp or now()).replace(':', '-')}-{tag}"
    for i in range(1000):
        d = run_dir / "history" / (base if i == 0 else f"{base}.{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot make a history folder under {run_dir / 'history'}")


def _finish(run_dir: Path, work: Path, record: dict, index: Path) -> None:
    """Write the attempt's record. In place, or, for a rerun beside a complete record: on success the
    old record and its files move to ``history/<finished>-replaced/`` and the new ones into the run
    folder (record.json last, atomically); on failure the complete record stays and the failed
    attempt goes to ``history/<finished>-failed/``."""
    if work == run_dir:
        write_record(run_dir, record, index)
        return
    if record["status"] == "complete":
        old = read_record(run_dir) or {}
        hist = _history_dir(run_dir, old.get("finished"), "replaced")
        if (run_dir / RECORD).exists():
            shutil.copy2(run_dir / RECORD, hist / _archive_name(RECORD, "replaced"))
        for name in sorted(os.listdir(work)):
            if (run_dir / name).exists():
                os.replace(run_dir / name, hist / _archive_name(name, "replaced"))
            os.replace(work / name, run_dir / name)
        write_record(run_dir, record, index)
        log.info("the rerun replaced the record at %s; the previous one is in %s", run_dir, hist)
    else:
        hist = _history_dir(run_dir, record.get("finished"), "failed")
        for name in sorted(os.listdir(work)):
            os.replace(work / name, hist / _archive_name(name, "failed"))
        write_record(hist, record, index, name=_archive_name(RECORD, "failed"))
        log.warning("the rerun failed; the complete record at %s is kept, the failed attempt is in %s", run_dir, hist)
    shutil.rmtree(work, ignore_errors=True)


def _attempt(cfg: DictConfig, run_dir: Path, chash: str, main: bool) -> dict:
    from cwac.tracking import RunLogger

    work = _prepare_attempt(run_dir) if main else run_dir
    index = Path(cfg.paths.runs) / "index.jsonl"
    base = {"run_dir": str(run_dir), "run_id": uuid.uuid4().hex, "cell": cell_name(cfg), "config_hash": chash,
            "config": resolved(cfg), "seed": cfg.seed, "stage": cfg.stage, "git": git_info(),
            "packages": package_versions(), "host": host_info(), "started": now()}
    if main:
        atomic_write_json(work / "started.json", base)
    logger = RunLogger(cfg.logger, work, base["config"], cell_name(cfg), cfg.sweep_name,
                       [f"model:{cfg.model.name}", f"task:{cfg.task.name}", f"p:{cfg.harmful.ratio}",
                        f"method:{cfg.method.name}", f"stage:{cfg.stage}"], enabled=main)
    t0 = time.time()
    try:
        inputs = check_inputs(cfg)   # the data, before any model loads
        record = _run(cfg, work, logger, main, inputs)
        record = {**base, **record, "status": "complete", "finished": now(), "data": {"files": data_fingerprint()},
                  "timings": {**record.get("timings", {}), "total_seconds": round(time.time() - t0, 1)}}
        logger.summary({k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))})
        logger.finish()
        if main:
            _finish(run_dir, work, record, index)
        return record
    except BaseException as e:
        logger.finish(failed=True)
        if main:
            _finish(run_dir, work, {**base, "status": "failed", "finished": now(), "data": {"files": data_fingerprint()},
                                    "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, index)
        raise


def _run(cfg: DictConfig, run_dir: Path, logger, main: bool, inputs: Inputs) -> dict:
    """The cell itself, on the checked ``inputs``; ``main``: this is rank 0, which alone evaluates."""
    from cwac.trainer import fit, to_device

    timings: dict = {}
    seed_everything(cfg.seed)
    store = ArtifactStore(cfg.paths.artifacts)
    t = time.time()
    start_path, base_path = start_model(cfg, store)
    timings["start_model_seconds"] = round(time.time() - t, 1)
    # Building the aligned artifact in this process re-seeds and trains; seed again so that the
    # cell that builds it and the cells that reuse it start from the same RNG state (LoRA init).
    seed_everything(cfg.seed)
    model, tok, fmt = load_chat_model(start_path, cfg.model, hub_ok=not cfg.offline)
    model = to_device(model)   # offline pieces (method.prepare) and training run where the engine will
    info: dict = {"start_model": start_path, "base_model": base_path}
    if cfg.model.align:
        info["alignment"] = ArtifactStore.meta(start_path)

    if cfg.stage == "align":
        if not main:
            return {"metrics": {}, "info": info, "timings": timings}
        for row in alignment_log(start_path):   # the build's own per-step losses and metrics
            logger.log({k: v for k, v in row.items() if k not in ("step", "nonfinite")}, step=row["step"])
        metrics = _evaluate(cfg, model, tok, fmt, run_dir, cfg.task.name)
        return {"metrics": metrics, "info": info, "timings": timings}
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=store, run_dir=run_dir,
                                      start_model_path=start_path, base_model_path=base_path)
    method = get_method(cfg.method.name)(cfg.method, ctx)
    if cfg.training.lora.enabled:
        model = apply_lora(model, cfg.training.lora)
    rows = inputs.rows   # the mix the pre-flight built
    harmful_rows = sum(e.source != cfg.task.name for e in rows)   # before a method adds its own rows
    res = fit(method, model, rows, cfg.training, tokenizer=tok, formatter=fmt, seed=cfg.seed, logger=logger,
              desc="finetune", resume_dir=run_dir / "resume")
    model, rows = res.model, res.rows
    timings["prepare_seconds"] = round(res.prepare_seconds, 1)
    timings["train_seconds"] = round(res.train.seconds, 1)
    timings["seconds_per_step"] = round(res.train.seconds / max(1, res.train.steps), 3)
    timings["other_cores"] = res.train.other_cores
    timings["resumed_from_step"] = res.train.resumed_from
    if res.train.resumed_from is not None:   # which processes trained it (host, threads): cwac.resume
        timings["segments"] = res.train.segments
    if not main:   # rank 0 evaluates and writes the record
        return {"metrics": {}, "info": info, "timings": timings}
    t = time.time()
    metrics = _evaluate(cfg, model, tok, fmt, run_dir, cfg.task.name)
    timings["eval_seconds"] = round(time.time() - t, 1)
    history = res.train.history
    metrics["train_loss_first"] = history[0]["losses/total"] if history else None
    metrics["train_loss_last"] = history[-1]["losses/total"] if history else None
    info.update({"n_train_rows": len(rows), "steps": res.train.steps, "packing": res.train.packing,
                 "method": method.record_info(),
                 "harmful_rows": harmful_rows})
    return {"metrics": metrics, "info": info, "timings": timings}
