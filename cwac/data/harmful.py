"""Harmful and harmless data: fine-tuning attack pairs, named prompt sets, held-in pools.

Evaluation prompt sets (``EVAL_HARMFUL_SETS``) are never used for training or calibration:
``held_in_harmful_prompts`` removes every prompt that appears (after whitespace/case
normalisation) in any of them and asserts the result is disjoint.
"""

from __future__ import annotations

import re
from functools import lru_cache

from cwac.data.examples import Example
from cwac.data.files import DataError, data_path, read_csv, read_json_list
from cwac.utils import normalize_prompt

_BT_PROMPT = re.compile(r"### Instruction:\n(.*)\n\n### Response:", re.S)


def beavertails_pairs(source: str = "local") -> list[Example]:
    """BeaverTails harmful (prompt, harmful answer) pairs.

    ``local``: the 200 ``is_safe == False`` rows of ``30k_train`` shipped in
    ``data/beavertails_derived`` (file order). ``hub``: every unsafe row of
    ``PKU-Alignment/BeaverTails`` ``30k_train`` in HF order (needs network).
    """
    if source == "hub":
        from datasets import load_dataset

        ds = load_dataset("PKU-Alignment/BeaverTails", split="30k_train")
        return [Example(r["prompt"], "", r["response"], "beavertails") for r in ds if not r["is_safe"]]
    if source != "local":
        raise ValueError(f"harmful source must be 'local' or 'hub', got {source!r}")
    path = data_path("beavertails_derived/train_merged_n1000_p0.2.json")
    rows = read_json_list(path, ["instruction", "output", "flag"], check=_bt_problem)
    return [Example(_BT_PROMPT.search(r["instruction"]).group(1).strip(), "", r["output"].strip(), "beavertails")
            for r in rows if r["flag"] == "unsafe"]


def _bt_problem(row: dict) -> str | None:
    """An attack pair (``flag`` unsafe) needs a prompt inside the Alpaca template and an answer."""
    if row["flag"] != "unsafe":
        return None
    m = _BT_PROMPT.search(row["instruction"])
    if not m:
        return "cannot find '### Instruction:...### Response:' in the prompt"
    if not m.group(1).strip():
        return "empty prompt between '### Instruction:' and '### Response:'"
    if not str(row["output"]).strip():
        return "empty text in field(s) ['output'] of an unsafe (attack) pair"
    return None


def _harmbench(split: str) -> list[str]:
    path = data_path(f"harmbench/harmbench_behaviors_text_{split}.csv")
    rows = read_csv(path, ["Behavior", "FunctionalCategory"], nonempty=["Behavior"])
    return [r["Behavior"].strip() for r in rows if r["FunctionalCategory"] == "standard"]


def _rd(name: str) -> list[str]:
    path = data_path(f"refusal_direction/{name}.json")
    return [r["instruction"].strip() for r in read_json_list(path, ["instruction"], nonempty=["instruction"])]


# StrongREJECT's six categories (Souly et al., 2024, arXiv 2402.10260) as they are spelled in
# refusal_direction ``harmful_test``; its 313 rows with these categories are StrongREJECT's prompts.
STRONGREJECT_CATEGORIES = frozenset({
    "Disinformation and deception", "Hate, harassment and discrimination", "Illegal goods and services",
    "Non-violent crimes", "Sexual content", "Violence"})


def _rd_harmful_test(strongreject: bool) -> list[str]:
    """refusal_direction ``harmful_test`` split by source: its StrongREJECT rows (313 conversational
    requests, held in for the alignment stage, minus the few that also occur in the rest) or the rest
    (259: JailbreakBench, HarmBench test, ...), which stays an evaluation set."""
    path = data_path("refusal_direction/harmful_test.json")
    rows = read_json_list(path, ["instruction", "category"], nonempty=["instruction"])
    rest = [r["instruction"].strip() for r in rows if r["category"] not in STRONGREJECT_CATEGORIES]
    if not strongreject:
        return rest
    banned = {normalize_prompt(p) for p in rest}
    return [r["instruction"].strip() for r in rows
            if r["category"] in STRONGREJECT_CATEGORIES and normalize_prompt(r["instruction"]) not in banned]


def _beavertails_eval() -> list[str]:
    path = data_path("beavertails_derived/BeaverTails.json")
    return [r["prompt"].strip() for r in read_json_list(path, ["prompt"], nonempty=["prompt"])]


def _advbench() -> list[str]:
    path = data_path("advbench/harmful_behaviors.csv")
    return [r["goal"].strip() for r in read_csv(path, ["goal", "target"], nonempty=["goal"])]


#: the paper's HS prompt set (docs/method.md §6.5): the first 1000 unsafe rows of BeaverTails ``30k_test``
BEAVERTAILS_TEST = {"dataset": "PKU-Alignment/BeaverTails", "split": "30k_test", "n": 1000}


class HubPromptSetError(DataError):
    """A prompt set that lives on the Hugging Face hub could not be read (offline, or no network)."""


def first_unsafe_prompts(rows, n: int, what: str = "the split") -> list[str]:
    """The prompts of the first ``n`` rows with ``is_safe == False``, in the split's order.

    Repeated prompts are kept, as in the reference protocol (Booster's and Antidote's
    ``poison/evaluation/pred.py``: one instruction per unsafe row until ``n``; docs/baselines.md,
    "Harmful score"), so that HS is over the same 1000 rows. ``rows`` is any iterable of mappings with ``prompt`` and ``is_safe``."""
    out: list[str] = []
    for r in rows:
        if not r["is_safe"]:
            out.append(str(r["prompt"]).strip())
            if len(out) == n:
                break
    if len(out) < n:
        raise DataError(f"{what} has only {len(out)} unsafe rows, fewer than the {n} the prompt set takes")
    return out


def _beavertails_30k_test() -> list[str]:
    """``beavertails_30k_test``: read with ``datasets`` from the hub (or its local cache). Offline
    (``offline=true`` sets ``HF_DATASETS_OFFLINE``) and not cached, it fails naming the set and the fix."""
    spec = BEAVERTAILS_TEST
    try:
        from datasets import load_dataset

        rows = load_dataset(spec["dataset"], split=spec["split"])
    except Exception as e:   # offline without a cache, no network, or no datasets package
        raise HubPromptSetError(
            f"prompt set 'beavertails_30k_test' (eval.hs_sets) is read from the hub ({spec['dataset']}, split "
            f"{spec['split']}) and could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Fix: run with offline=false to download it (it is cached for later offline runs), or leave it out of "
            "eval.hs_sets (e.g. eval.hs_sets=[beavertails_eval,harmbench_test])") from None
    return first_unsafe_prompts(rows, spec["n"], f"{spec['dataset']} {spec['split']}")


def _beavertails_attack_half(half: str) -> list[str]:
    """The local attack pairs' prompts split in file order. ``front``: the distinct prompts of rows
    0-99, which validate and are the only harmful rows of the CPU preset's mixes up to p = 0.2 (n = 400
    takes the first n*p pairs, ``build_finetune_mix``). ``back``: the distinct prompts of rows 100-199
    that are not in the front, which the alignment stage may train refusals on."""
    prompts = [e.instruction for e in beavertails_pairs("local")]
    front, back, seen = [], [], set()
    for i, q in enumerate(prompts):
        if normalize_prompt(q) not in seen:
            seen.add(normalize_prompt(q))
            (front if i < 100 else back).append(q)
    return front if half == "front" else back


PROMPT_SETS = {
    # harmful, evaluation only
    "beavertails_eval": _beavertails_eval,        # 140 BeaverTails-style prompts (closest to the paper's HS set)
    "harmbench_test": lambda: _harmbench("test"),  # 159 standard behaviours
    "harmbench_val": lambda: _harmbench("val"),    # 41 standard behaviours
    "rd_harmful_test": lambda: _rd_harmful_test(False),  # 259 of 572 (JailbreakBench, HarmBench test, ...)
    "rd_harmful_val": lambda: _rd("harmful_val"),
    # harmful, evaluation only, read from the hub (offline=false, or a filled datasets cache): the paper's HS set
    "beavertails_30k_test": _beavertails_30k_test,   # first 1000 unsafe rows of BeaverTails 30k_test
    # harmful, validation: the local attack pairs' 200 BeaverTails prompts (which the default recipe never
    # aligns on), used with harmbench_val to choose the alignment recipe without touching the HS sets
    # (README, organism); only the front 100 when a recipe aligns on the back (beavertails_attack_back)
    "beavertails_attack": lambda: [e.instruction for e in beavertails_pairs("local")],
    "beavertails_attack_val": lambda: _beavertails_attack_half("front"),  # 100: validation when the back is aligned on
    # harmful, held-in (alignment / calibration)
    "advbench": _advbench,
    "rd_harmful_train": lambda: _rd("harmful_train"),
    # harmful, held in for the alignment stage only (``alignment.extra_harmful_sets``): conversational
    # requests, which the imperative AdvBench-style pool above lacks
    "strongreject": lambda: _rd_harmful_test(True),  # 310, the other part of refusal_direction harmful_test
    "beavertails_attack_back": lambda: _beavertails_attack_half("back"),  # 98 BeaverTails questions (rows 100-199)
    # harmless
    "rd_harmless_train": lambda: _rd("harmless_train"),
    "rd_harmless_val": lambda: _rd("harmless_val"),
    "rd_harmless_test": lambda: _rd("harmless_test"),
}
EVAL_HARMFUL_SETS = ("beavertails_eval", "harmbench_test", "harmbench_val", "rd_harmful_test", "rd_harmful_val")
# evaluation-only sets on the hub: not in EVAL_HARMFUL_SETS, whose disjointness checks every run makes offline
HUB_EVAL_HARMFUL_SETS = ("beavertails_30k_test",)
HELD_IN_HARMFUL_SETS = ("advbench", "rd_harmful_train")
ALIGNMENT_ONLY_HARMFUL_SETS = ("strongreject", "beavertails_attack_back")   # kept out of the held-in pool
VALIDATION_HARMFUL_SETS = ("beavertails_attack_val", "harmbench_val")   # recipes are chosen here; never trained on


@lru_cache(maxsize=None)
def prompt_set(name: str) -> tuple[str, ...]:
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; valid sets: {', '.join(sorted(PROMPT_SETS))}")
    return tuple(PROMPT_SETS[name]())


def eval_harmful_norms() -> set[str]:
    return {normalize_prompt(p) for s in EVAL_HARMFUL_SETS for p in prompt_set(s)}


def held_in_harmful_prompts() -> list[str]:
    """De-duplicated harmful prompts for alignment, calibration and SAE corpora.

    AdvBench + refusal_direction ``harmful_train`` minus every prompt of every evaluation
    set and of the alignment-only sets. Deterministic order (AdvBench first, then the rest).
    """
    banned = eval_harmful_norms().union(*(_normalized(s) for s in ALIGNMENT_ONLY_HARMFUL_SETS))
    seen: set[str] = set()
    out = []
    for s in HELD_IN_HARMFUL_SETS:
        for p in prompt_set(s):
            k = normalize_prompt(p)
            if k in banned or k in seen:
                continue
            seen.add(k)
            out.append(p)
    assert_disjoint(out, EVAL_HARMFUL_SETS)
    return out


def _normalized(prompt_set_name: str) -> set[str]:
    return {normalize_prompt(p) for p in prompt_set(prompt_set_name)}


def assert_disjoint(prompts, eval_sets=EVAL_HARMFUL_SETS) -> None:
    """Raise if any prompt also appears in an evaluation set (normalised text)."""
    for s in eval_sets:
        ev = _normalized(s)
        clash = [p for p in prompts if normalize_prompt(p) in ev]
        if clash:
            raise AssertionError(f"{len(clash)} training/calibration prompt(s) also appear in evaluation set {s!r}, e.g. {clash[0]!r}")


def drop_eval_prompts(rows: list[Example], eval_sets=EVAL_HARMFUL_SETS) -> tuple[list[Example], int]:
    """``rows`` without those whose prompt (``instruction``) is in an evaluation set, and how many
    were dropped: the hub's BeaverTails ``30k_train`` can share prompts with evaluation sets."""
    ev = set().union(*(_normalized(s) for s in eval_sets))
    kept = [e for e in rows if normalize_prompt(e.instruction) not in ev]
    return kept, len(rows) - len(kept)


def alpaca_examples() -> list[Example]:
    """The 5k Stanford Alpaca rows (harmless instruction -> helpful answer)."""
    path = data_path("alpaca/alpaca_5000.json")
    return [Example(r["instruction"].strip(), r["input"].strip(), r["output"].strip(), "alpaca")
            for r in read_json_list(path, ["instruction", "input", "output"], nonempty=["instruction"])]


def harmless_eval_prompts(name: str = "rd_harmless_test") -> list[str]:
    """Harmless prompts for over-refusal, minus any instruction seen in Alpaca training rows."""
    seen = {normalize_prompt(e.instruction) for e in alpaca_examples() if not e.input}
    return [p for p in prompt_set(name) if normalize_prompt(p) not in seen]
