"""Fine-tune accuracy (FA) scorers, following the shared protocol of the harmful-fine-tuning
literature (docs/baselines.md, "Fine-tune accuracy"). ``exact`` is the Booster line's rule
(non-conforming answers are wrong on purpose); ``substring`` is Vaccine's.

PubMedQA (yes/no/maybe accuracy, docs/method.md §6.5) parses the decision from the generation
(``pubmedqa_extract``): under ``exact`` it is the answer's first word, lower-cased with the
punctuation around it removed, and it must be ``yes``, ``no`` or ``maybe``; under ``substring`` it
is the first of those three words anywhere in the answer. Anything else is no decision, which is
wrong. AlpacaEval has no per-answer score: its FA is a judged win rate (``eval/alpaca_eval.py``)."""

from __future__ import annotations

import math
import re

_NUM = re.compile(r"-?\d+\.?\d*")
_WORD = re.compile(r"[a-z]+")
PUBMEDQA_DECISIONS = ("yes", "no", "maybe")


def gsm8k_extract(text: str) -> float:
    """Delete commas; if 'The final answer is: ' occurs take the first number after it,
    else the last number; float, or inf when there is none."""
    text = text.replace(",", "")
    marker = "The final answer is: "
    if marker in text:
        nums = _NUM.findall(text.split(marker, 1)[1])
        cand = nums[0] if nums else None
    else:
        nums = _NUM.findall(text)
        cand = nums[-1] if nums else None
    try:
        return float(cand) if cand is not None else math.inf
    except ValueError:
        return math.inf


def _label_forms(label: str) -> set[str]:
    forms = {label, label.lower(), label.capitalize()}
    if label == "Sci/Tech":
        forms |= {"sci", "Sci", "sci/tech"}
    return forms


def label_correct(answer: str, label: str, match: str = "exact") -> bool:
    a = answer.strip()
    if match == "exact":
        return a in _label_forms(label)
    if match == "substring":
        key = "sci" if label == "Sci/Tech" else label.lower()
        return key in a.lower()
    raise ValueError(f"eval.fa_match must be 'exact' or 'substring', got {match!r}")


def pubmedqa_extract(text: str, match: str = "exact") -> str | None:
    """The yes/no/maybe decision of an answer, or None (see the module docstring)."""
    words = _WORD.findall(text.lower())
    if match == "exact":
        return words[0] if words and words[0] in PUBMEDQA_DECISIONS else None
    if match == "substring":
        return next((w for w in words if w in PUBMEDQA_DECISIONS), None)
    raise ValueError(f"eval.fa_match must be 'exact' or 'substring', got {match!r}")


def score(task: str, answer: str, label: str, match: str = "exact") -> bool:
    if task in ("sst2", "agnews"):
        return label_correct(answer, label, match)
    if task == "gsm8k":
        pred = gsm8k_extract(answer)
        return math.isfinite(pred) and pred == gsm8k_extract(label)
    if task == "pubmedqa":
        return pubmedqa_extract(answer, match) == label
    if task == "alpaca_eval":
        raise KeyError("task alpaca_eval has no per-answer FA score: its FA is a judged win rate "
                       "(eval.alpaca_eval.win_rate)")
    raise KeyError(f"no FA scorer for task {task!r}; valid tasks: agnews, gsm8k, pubmedqa, sst2")
