"""A cell's start model, and the alignment stage that builds the aligned organism once.

The stage safety-tunes a chat model with the same lifecycle as fine-tuning (``cwac.trainer.fit``)
and stores the result as an artifact keyed by everything that changes its weights
(``cwac.alignment.alignment_key``); every later cell with the same recipe reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cwac.alignment import alignment_key, alignment_rows, alignment_training
from cwac.api import TrainContext
from cwac.artifacts import ArtifactStore
from cwac.experiment.plugins import get_method
from cwac.models import load_chat_model, resolve_model_path
from cwac.trainer import fit, to_device
from cwac.utils import seed_everything, stable_hash, strict_json

TRAIN_LOG = "train_log.jsonl"   # the build's per-step losses and metrics, kept inside the artifact


def aligned_key(cfg: DictConfig) -> dict:
    """The artifact key of the aligned model that ``cfg`` fine-tunes."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    return alignment_key(cfg, {k: m.get(k) for k in ("source", "tiny", "gguf", "path")})


def start_model(cfg: DictConfig, store: ArtifactStore, build: bool = True) -> tuple[str, str | None]:
    """(path training starts from, pre-alignment base path or None).

    With ``model.align=true`` the start model is our aligned artifact: built here when missing
    and ``build`` (one process only), else an error saying how to build it.
    """
    path = resolve_model_path(cfg.model, store)
    if not cfg.model.align:
        return path, cfg.model.base_path
    key = aligned_key(cfg)
    if not store.exists("aligned", key):
        if not build:
            raise RuntimeError(f"the aligned model for {cfg.model.name} is not in {store.root}; build it first "
                               "with `python run.py stage=align` and the same model and alignment overrides")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("the aligned model is not built yet, and building it under a multi-rank launcher "
                               "would hang (rank 0 trains it and waits for ranks that wait on its lock); build it "
                               "once in one process with the same model and alignment overrides: "
                               "python run.py stage=align ...")
    aligned = store.get_or_build("aligned", key, lambda out: build_aligned(cfg, store, path, out,
                                                                           store.resume_dir("aligned", key)))
    return str(aligned), path


def build_aligned(cfg: DictConfig, store: ArtifactStore, base_path: str, out: Path, resume_dir: Path | None = None) -> dict:
    """Train the alignment recipe on ``base_path`` and save the aligned model into ``out``; the loop
    checkpoints itself in ``resume_dir`` (every ``training.checkpoint_minutes``), and a build killed
    before it completes goes on from there the next time (``cwac.resume``)."""
    acfg = cfg.alignment
    seed_everything(acfg.seed)
    model, tok, fmt = load_chat_model(base_path, cfg.model)
    model = to_device(model)
    tc = alignment_training(cfg)
    ctx = TrainContext(training=tc, tokenizer=tok, formatter=fmt, store=store, run_dir=out, stage="align",
                       start_model_path=base_path, base_model_path=base_path, seed=int(acfg.seed),
                       task=None, model_name=cfg.model.name, hub_ok=not cfg.offline, alignment=acfg,
                       aligned_by_us=False)
    method_cls = get_method(acfg.method.name)
    if "align" not in method_cls.stages:
        raise ValueError(f"method {acfg.method.name!r} cannot run in the alignment stage")
    method = method_cls(acfg.method, ctx)
    res = fit(method, model, alignment_rows(acfg, acfg.seed), tc, tokenizer=tok, formatter=fmt, seed=acfg.seed,
              desc="align", resume_dir=resume_dir)
    res.model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "alignment_rows.sha").write_text(stable_hash([e.to_dict() for e in res.rows]) + "\n")
    (out / TRAIN_LOG).write_text("".join(strict_json({"step": h["step"], **{f"align/{k}": v for k, v in h.items()
                                                                            if k != "step"}}) + "\n"
                                         for h in res.train.history))
    losses = [h["losses/total"] for h in res.train.history]
    return {"steps": res.train.steps, "train_seconds": round(res.train.seconds, 1), "n_rows": len(res.rows),
            "resumed_from_step": res.train.resumed_from,
            "segments": res.train.segments if res.train.resumed_from is not None else None,
            "other_cores": res.train.other_cores,
            "packing": res.train.packing,
            "loss_first": losses[0], "loss_last": losses[-1], "weights_sha256": weights_digest(out),
            "method": acfg.method.name,
            "method_info": method.record_info(),
            "refusal_source": "bank:openers x reasons x redirects (cwac/alignment.py)"}


def alignment_log(path: str | Path) -> list[dict]:
    """The per-step rows (``align/losses/...``, ``align/metrics/...``) of the build that made the
    aligned artifact at ``path``, in ``train_log.jsonl``'s format; an alignment-stage record copies
    them, so a defence's own terms (Booster's h(w) and h(w'), RepNoise's noise and retain losses)
    travel with the artifact's record. Empty for an artifact built before builds kept them."""
    f = Path(path) / TRAIN_LOG
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def weights_digest(folder: Path) -> str:
    """sha256 over the folder's ``*.safetensors`` files, in name order.

    The artifact key says what recipe built the weights, not which floats came out: the same key
    built at another torch thread count (or on another ISA) reduces in another order and ends on
    other floats (Vaccine's last loss 1.6399 at two threads, 1.6240 at one: docs/organism.md, "One
    key, two builds"). Every cell record copies
    this digest (``info.alignment.meta``), so it names the very weights it started from.
    """
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()
