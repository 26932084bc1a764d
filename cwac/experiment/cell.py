"""One experiment cell, end to end: seed -> start model -> method -> data -> fit -> evaluate
-> record. ``run.py`` is a thin Hydra wrapper around ``run_cell``.

Stages (``stage=``):
  * ``finetune`` (default): fine-tune the (aligned) model on the poisoned task mix with a method.
  * ``align``: build (or reuse) the aligned model artifact and evaluate it (no fine-tuning).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cwac.api import TrainContext
from cwac.artifacts import ArtifactStore
from cwac.data.mix import build_finetune_mix
from cwac.experiment.align import start_model
from cwac.experiment.plugins import get_judge, get_method
from cwac.models import load_chat_model
from cwac.schema import TrainingConfig, check_node
from cwac.records import (config_hash, git_info, is_complete, now, package_versions, read_record, resolved,
                          write_record)
from cwac.utils import OFFLINE_ENV, atomic_write_json, host_info, seed_everything
from eval.factory import build_backend
from eval.harness import evaluate, selected_prompts

log = logging.getLogger(__name__)


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


def apply_lora(model, lcfg: DictConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                            target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM"))


def _evaluate(cfg, model, tok, fmt, run_dir: Path, task: str | None) -> dict:
    judge_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.judge, resolve=True).items() if k not in ("name", "threshold")}
    judge = get_judge(cfg.judge.name)(**judge_kwargs)
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


def check_config(cfg: DictConfig) -> None:
    """Refuse a config whose typed nodes do not fit their schemas (``cwac.schema``): the training
    node, and the node of every method the cell runs. Costs milliseconds; nothing is loaded."""
    check_node(cfg.training, TrainingConfig, "training")
    for where, node in (("method", cfg.method), ("alignment.method", cfg.alignment.method)):
        schema = get_method(node.name).schema
        if schema is not None:
            check_node(node, schema, where)


def run_cell(cfg: DictConfig) -> dict:
    """Run one cell and return its record (or the existing complete record when resuming)."""
    check_config(cfg)
    setup_env(cfg)
    chash = config_hash(cfg)
    run_dir = run_dir_for(cfg)
    if cfg.skip_complete and is_complete(run_dir, chash):
        log.info("complete record exists for this config at %s; skipping (skip_complete=false reruns)", run_dir)
        return read_record(run_dir)  # type: ignore[return-value]
    from cwac.tracking import RunLogger
    from cwac.trainer import is_main_process

    # Under a multi-rank launcher every rank trains its shard; only rank 0 logs, evaluates and
    # writes (the others would duplicate train_log lines, W&B runs and the whole evaluation).
    main = is_main_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("record.json", "train_log.jsonl") if main else ():  # a rerun of a crashed/killed cell starts clean
        (run_dir / stale).unlink(missing_ok=True)
    index = Path(cfg.paths.runs) / "index.jsonl"
    base = {"run_dir": str(run_dir), "cell": cell_name(cfg), "config_hash": chash, "config": resolved(cfg),
            "seed": cfg.seed, "stage": cfg.stage, "git": git_info(), "packages": package_versions(),
            "host": host_info(), "started": now()}
    if main:
        atomic_write_json(run_dir / "started.json", base)
    logger = RunLogger(cfg.logger, run_dir, base["config"], cell_name(cfg), cfg.sweep_name,
                       [f"model:{cfg.model.name}", f"task:{cfg.task.name}", f"p:{cfg.harmful.ratio}",
                        f"method:{cfg.method.name}", f"stage:{cfg.stage}"], enabled=main)
    t0 = time.time()
    try:
        record = _run(cfg, run_dir, logger, main)
        record = {**base, **record, "status": "complete", "finished": now(),
                  "timings": {**record.get("timings", {}), "total_seconds": round(time.time() - t0, 1)}}
        logger.summary({k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))})
        logger.finish()
        if main:
            write_record(run_dir, record, index)
        return record
    except BaseException as e:
        logger.finish(failed=True)
        if main:
            write_record(run_dir, {**base, "status": "failed", "finished": now(),
                                   "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, index)
        raise


def _run(cfg: DictConfig, run_dir: Path, logger, main: bool) -> dict:
    """The cell itself; ``main``: this is rank 0, which alone evaluates."""
    from cwac.trainer import fit, to_device

    timings: dict = {}
    if main:   # a bad evaluation count fails now, not after the build and the training
        selected_prompts(cfg.eval)
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
        metrics = _evaluate(cfg, model, tok, fmt, run_dir, cfg.task.name)
        return {"metrics": metrics, "info": info, "timings": timings}
    if cfg.stage != "finetune":
        raise ValueError(f"stage must be 'finetune' or 'align', got {cfg.stage!r}")

    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=store, run_dir=run_dir,
                                      start_model_path=start_path, base_model_path=base_path)
    method = get_method(cfg.method.name)(cfg.method, ctx)
    if "finetune" not in method.stages:
        raise ValueError(f"method {cfg.method.name!r} is an alignment-stage method; set alignment.method instead")
    if cfg.training.lora.enabled:
        model = apply_lora(model, cfg.training.lora)
    rows = build_finetune_mix(cfg.task.name, cfg.harmful.n_total, cfg.harmful.ratio, cfg.seed,
                              harmful_source=cfg.harmful.source, task_source=cfg.task.source)
    harmful_rows = sum(e.source != cfg.task.name for e in rows)   # before a method adds its own rows
    res = fit(method, model, rows, cfg.training, tokenizer=tok, formatter=fmt, seed=cfg.seed, logger=logger,
              desc="finetune")
    model, rows = res.model, res.rows
    timings["prepare_seconds"] = round(res.prepare_seconds, 1)
    timings["train_seconds"] = round(res.train.seconds, 1)
    timings["seconds_per_step"] = round(res.train.seconds / max(1, res.train.steps), 3)
    if not main:   # rank 0 evaluates and writes the record
        return {"metrics": {}, "info": info, "timings": timings}
    t = time.time()
    metrics = _evaluate(cfg, model, tok, fmt, run_dir, cfg.task.name)
    timings["eval_seconds"] = round(time.time() - t, 1)
    history = res.train.history
    metrics["train_loss_first"] = history[0]["losses/total"] if history else None
    metrics["train_loss_last"] = history[-1]["losses/total"] if history else None
    info.update({"n_train_rows": len(rows), "steps": res.train.steps, "method": method.record_info(),
                 "harmful_rows": harmful_rows})
    return {"metrics": metrics, "info": info, "timings": timings}
