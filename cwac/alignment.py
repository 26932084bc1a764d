"""The alignment stage's recipe: its rows, its training node and the key of the aligned
artifact. The stage itself (train with the same loop and ``Method`` interface as fine-tuning,
store the result as a reusable artifact, the CPU organism) runs in ``cwac.experiment.align``.

Data: held-in harmful prompts (AdvBench + refusal_direction ``harmful_train``, with every
evaluation prompt removed, plus any ``extra_harmful_sets`` such as StrongREJECT's questions;
disjointness from every evaluation set asserted) -> refusals, plus Alpaca instructions
-> their Alpaca answers. Refusals are composed from a bank of openers, reasons and
redirections (``refusal_text``), seeded per prompt, so they are varied but reproducible;
no model writes them. The chat template is the one used at evaluation.
"""

from __future__ import annotations

import random

from omegaconf import DictConfig, OmegaConf

from cwac.data.examples import Example
from cwac.data.harmful import (ALIGNMENT_ONLY_HARMFUL_SETS, EVAL_HARMFUL_SETS, VALIDATION_HARMFUL_SETS,
                               alpaca_examples, assert_disjoint, held_in_harmful_prompts, prompt_set)
from cwac.utils import normalize_prompt

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
    for name in acfg.extra_harmful_sets or ():
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
    Logging and checkpointing knobs are left out (here and in ``alignment.training``), and so are LoRA's settings while the stage trains without LoRA, so that a
    ``training=lora`` fine-tuning cell reuses the fully fine-tuned organism."""
    tc = OmegaConf.to_container(alignment_training(cfg), resolve=True)
    for k in ("progress", "log_every", "checkpoint_minutes"):
        tc.pop(k, None)
    if not tc["lora"]["enabled"]:
        tc["lora"] = {"enabled": False}
    if not tc.get("packing"):   # padded batches, as every organism up to v5 trained: their keys stand
        tc.pop("packing", None)
    recipe = OmegaConf.to_container(cfg.alignment, resolve=True)
    for k in ("progress", "log_every", "checkpoint_minutes"):
        (recipe.get("training") or {}).pop(k, None)
    return {"base": base_path_key, "alignment": recipe, "training": tc, "dtype": cfg.model.dtype, "prompt_format": cfg.model.prompt_format,
            "system_prompt": cfg.model.system_prompt}
