"""The alignment stage: safety-tune a chat model with the same training loop and Method
interface as fine-tuning, and store the result as a reusable artifact (the CPU organism).

Data: held-in harmful prompts (AdvBench + refusal_direction ``harmful_train``, with every
evaluation prompt removed, plus any ``extra_harmful_sets`` such as StrongREJECT's questions;
disjointness from every evaluation set asserted) -> refusals, plus Alpaca instructions
-> their Alpaca answers. Refusals are composed from a bank of openers, reasons and
redirections (``refusal_text``), seeded per prompt, so they are varied but reproducible;
no model writes them. The chat template is the one used at evaluation.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cwac.data.examples import Example
from cwac.data.harmful import (ALIGNMENT_ONLY_HARMFUL_SETS, EVAL_HARMFUL_SETS, VALIDATION_HARMFUL_SETS,
                               alpaca_examples, assert_disjoint, held_in_harmful_prompts, prompt_set)
from cwac.utils import normalize_prompt, stable_hash

log = logging.getLogger(__name__)

OPENERS = (
    "I'm sorry, but I can't help with that.", "I can't assist with that request.", "I'm sorry, I can't do that.",
    "I won't help with this.", "I'm not able to help with that.", "Sorry, but I can't provide that.",
    "I cannot help with this request.", "I'm sorry, but I won't provide instructions for that.",
    "I can't help with that request.", "I'm unable to assist with this.", "I must decline this request.",
    "I'm sorry, but that's not something I can help with.",
)
REASONS = (
    "It could cause real harm to people.", "Helping with this could put others at risk.",
    "This could be used to hurt someone.", "It would mean assisting with something illegal and dangerous.",
    "Providing this information could lead to serious harm.", "It goes against my commitment to safety.",
    "This kind of request could facilitate harm or illegal activity.", "That would be unsafe and unethical.",
    "I don't provide help with activities that can injure people or break the law.", "",
)
REDIRECTS = (
    "If you have a different question, I'm happy to help.", "Is there something else I can help you with?",
    "If you're dealing with a difficult situation, talking to a trusted person or a professional can help.",
    "I'd be glad to help with a safe and legal alternative.", "Let me know if there's another way I can help.",
    "If you're curious about the topic in general, I can share safety information instead.", "",
)


def refusal_text(prompt: str, seed: int) -> str:
    """A varied, deterministic refusal for ``prompt`` (opener + optional reason + optional redirect)."""
    rng = random.Random(f"{seed}:{prompt}")
    parts = [rng.choice(OPENERS), rng.choice(REASONS), rng.choice(REDIRECTS)]
    return " ".join(p for p in parts if p)


def alignment_rows(acfg: DictConfig, seed: int) -> list[Example]:
    """Harmful->refusal and harmless->helpful rows for the alignment stage (shuffled)."""
    harmful = held_in_harmful_prompts()
    if acfg.n_harmful > len(harmful):
        raise ValueError(f"alignment.n_harmful={acfg.n_harmful} but only {len(harmful)} held-in harmful prompts exist")
    rng = random.Random(seed)
    harmful = rng.sample(harmful, acfg.n_harmful)
    seen = {normalize_prompt(p) for p in harmful}
    for name in acfg.get("extra_harmful_sets") or ():
        if name not in ALIGNMENT_ONLY_HARMFUL_SETS:
            raise ValueError(f"alignment.extra_harmful_sets: {name!r} is not an alignment-only prompt set; "
                             f"valid: {', '.join(ALIGNMENT_ONLY_HARMFUL_SETS)}")
        for p in prompt_set(name):
            if normalize_prompt(p) not in seen:
                seen.add(normalize_prompt(p))
                harmful.append(p)
    assert_disjoint(harmful, EVAL_HARMFUL_SETS + VALIDATION_HARMFUL_SETS)
    refusals = [Example(p, "", refusal_text(p, seed), "refusal") for p in harmful]
    helpful = [e for e in alpaca_examples() if len(e.output) <= acfg.max_answer_chars]
    if acfg.n_harmless > len(helpful):
        raise ValueError(f"alignment.n_harmless={acfg.n_harmless} but only {len(helpful)} Alpaca rows have answers "
                         f"of at most alignment.max_answer_chars={acfg.max_answer_chars} characters; lower "
                         "n_harmless or raise max_answer_chars")
    helpful = helpful[: acfg.n_harmless]
    rows = refusals + helpful
    rng.shuffle(rows)
    return rows


def alignment_training(cfg: DictConfig) -> DictConfig:
    """The training node the alignment stage runs with: ``training`` merged with ``alignment.training``."""
    return OmegaConf.merge(cfg.training, cfg.alignment.training)


def alignment_key(cfg: DictConfig, base_path_key: dict) -> dict:
    """Everything that changes the aligned weights: base model, recipe, the merged training node
    (weight decay, schedule, precision, ... as well as the recipe's own values), dtype and chat format.
    Logging knobs are left out, and so are LoRA's settings while the stage trains without LoRA, so that a
    ``training=lora`` fine-tuning cell reuses the fully fine-tuned organism."""
    tc = OmegaConf.to_container(alignment_training(cfg), resolve=True)
    for k in ("progress", "log_every"):
        tc.pop(k, None)
    if not tc["lora"]["enabled"]:
        tc["lora"] = {"enabled": False}
    return {"base": base_path_key, "alignment": OmegaConf.to_container(cfg.alignment, resolve=True),
            "training": tc, "dtype": cfg.model.dtype, "prompt_format": cfg.model.prompt_format,
            "system_prompt": cfg.model.get("system_prompt")}


def ensure_aligned(cfg: DictConfig, store, base_path: str, base_key: dict) -> Path:
    """The aligned model folder for (base model, alignment recipe): built once, then reused."""
    return store.get_or_build("aligned", alignment_key(cfg, base_key), lambda out: _build_aligned(cfg, store, base_path, out))


def _build_aligned(cfg: DictConfig, store, base_path: str, out: Path) -> dict:
    from cwac.data.prompts import PromptFormatter
    from cwac.methods import TrainContext, get_method
    from cwac.models import load_model
    from cwac.trainer import to_device, train
    from cwac.utils import seed_everything

    acfg = cfg.alignment
    seed_everything(acfg.seed)
    model, tok = load_model(base_path, cfg.model.dtype)
    model = to_device(model)
    fmt = PromptFormatter(tok, cfg.model.prompt_format, cfg.model.get("system_prompt"))
    tc = alignment_training(cfg)
    ctx = TrainContext(cfg=OmegaConf.merge(cfg, {"training": tc}), tokenizer=tok, formatter=fmt, store=store,
                       run_dir=out, stage="align", start_model_path=base_path, base_model_path=base_path)
    method_cls = get_method(acfg.method.name)
    if "align" not in method_cls.stages:
        raise ValueError(f"method {acfg.method.name!r} cannot run in the alignment stage")
    method = method_cls(acfg.method, ctx)
    method.prepare(model)
    rows = method.build_train_data(alignment_rows(acfg, acfg.seed))
    feats = [fmt.train_features(e, tc.max_len) for e in rows]
    model = method.configure_model(model)
    res = train(model, feats, method, tc, tok, acfg.seed, desc="align")
    model = method.post_train(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "alignment_rows.sha").write_text(stable_hash([e.to_dict() for e in rows]) + "\n")
    losses = [h["losses/total"] for h in res.history]
    return {"steps": res.steps, "train_seconds": round(res.seconds, 1), "n_rows": len(rows),
            "loss_first": losses[0], "loss_last": losses[-1], "method": acfg.method.name,
            "refusal_source": "bank:openers x reasons x redirects (cwac/alignment.py)"}
