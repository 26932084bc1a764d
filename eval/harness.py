"""Run HS, over-refusal and FA on one model and write every generation with its label.

Outputs (in ``out_dir``): ``samples_hs_<set>.jsonl``, ``samples_harmless.jsonl``,
``samples_fa_<task>.jsonl``; returns the metrics dict stored in the result record. A model whose
answers are all empty is refused (``EmptyAnswersError``) rather than scored.

HS metrics (``metrics``):

* ``hs_by_set``: the primary judge's (``judge=``) HS per prompt set.
* ``hs``: with ``eval.hs_pool`` true (conf/eval/default.yaml) the pooled HS over
  every prompt of every set; with ``eval.hs_pool=false`` (the paper protocol, ``eval=paper``)
  sets are never pooled and ``hs`` is the HS of the first set of ``eval.hs_sets`` alone, named by
  ``hs_set``. ``hs_pool`` records which.
* ``hs_by_judge``: ``{judge name: {"hs", "hs_by_set"}}`` for the primary judge and the weight-free
  keyword judge (``eval.judges.KeywordRefusalJudge``), which scores the same answers in every
  record as a second judge (once when the primary is keyword); ``judges`` holds each one's
  ``describe()``. Each HS sample row carries the keyword verdict (``keyword_flagged``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from cwac.data.examples import Example
from cwac.data.harmful import harmless_eval_prompts, prompt_set
from cwac.data.tasks import load_task
from eval import alpaca_eval
from eval.backends import GenerationBackend
from eval.judges import Judge, KeywordRefusalJudge, is_refusal
from eval.scorers import score


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _take(items, n, what: str = "the set", key: str = "the count"):
    """``n`` rows spread evenly over the set (all when ``n`` is None). The prompt sets are grouped by
    category (BeaverTails-style: 14 blocks of 10), so the first ``n`` would drop whole categories."""
    items = list(items)
    if n is None:
        return items
    if n > len(items):
        raise ValueError(f"{key}={n} but {what} has {len(items)} prompts; "
                         f"set {key}<={len(items)} or {key}=null (all of them)")
    return [items[i * len(items) // n] for i in range(n)]


def selected_prompts(ecfg: DictConfig) -> tuple[dict[str, list[str]], list[str]]:
    """The HS prompts per set and the harmless prompts that ``ecfg`` asks for; raises, naming the
    key and the fix, if a set is unknown or smaller than its count, or ``eval.hs_pool`` is not a
    bool. Called before training too (the pre-flight's ``check_inputs``)."""
    hs_pooled(ecfg)
    hs = {s: _take(prompt_set(s), ecfg.hs_n, f"HS set {s!r}", "eval.hs_n") for s in ecfg.hs_sets}
    harmless = (_take(harmless_eval_prompts(ecfg.harmless_set), ecfg.harmless_n,
                      f"harmless set {ecfg.harmless_set!r}", "eval.harmless_n") if ecfg.harmless_n else [])
    return hs, harmless


def hs_pooled(ecfg: DictConfig) -> bool:
    """``eval.hs_pool`` (conf/eval/default.yaml): pool HS over the sets (true) or report each set
    alone (false)."""
    v = ecfg.hs_pool
    if not isinstance(v, bool):
        raise ValueError(f"config eval.hs_pool={v!r} is not valid: it must be true (pool HS over eval.hs_sets) "
                         "or false (HS per set, metrics.hs = the first set's)")
    return v


def _second_judges(judge: Judge) -> dict[str, Judge]:
    """The judges that score every answer beside the primary one: the keyword judge (weight-free),
    unless the primary is the keyword judge itself."""
    return {} if judge.name == KeywordRefusalJudge.name else {KeywordRefusalJudge.name: KeywordRefusalJudge()}


def evaluate(backend: GenerationBackend, judge: Judge, ecfg: DictConfig, task: str | None, out_dir: Path,
             judge_threshold: float = 0.5, task_source: str = "local") -> dict:
    """Evaluate one model.

    Args:
        judge: the primary HS judge; the keyword judge scores the same answers too (module doc).
        ecfg: the ``eval`` config node (sets, counts, max_new_tokens, FA match mode, ``hs_pool``).
        task: the fine-tuning task whose FA to score (None skips FA).
        task_source: where the task's rows come from (``task.source``: ``local`` or ``hub``), the
            same source fine-tuning read.
    """
    out_dir = Path(out_dir)
    pool = hs_pooled(ecfg)
    metrics: dict = {"hs_by_set": {}, "counts": {}, "seconds": {}}
    every_answer: list[str] = []
    seconds = _second_judges(judge)
    by_judge = {name: {"hs_by_set": {}, "flagged": 0} for name in (judge.name, *seconds)}
    n_total = 0
    hs_prompts, harmless_prompts = selected_prompts(ecfg)
    for s, prompts in hs_prompts.items():
        t0 = time.time()
        answers = backend.generate([Example(p) for p in prompts], ecfg.hs_max_new_tokens, desc=f"HS {s}")
        every_answer += answers
        labels = {judge.name: judge.predict(prompts, answers, judge_threshold)}
        labels.update({name: j.predict(prompts, answers, judge_threshold) for name, j in seconds.items()})
        rows = [{"prompt": p, "answer": a, **lab} for p, a, lab in zip(prompts, answers, labels[judge.name])]
        for name in seconds:
            for row, lab in zip(rows, labels[name]):
                row[f"{name}_flagged"] = lab["flagged"]
        _write_jsonl(out_dir / f"samples_hs_{s}.jsonl", rows)
        for name, labs in labels.items():
            flagged = sum(lab["flagged"] for lab in labs)
            by_judge[name]["hs_by_set"][s] = 100.0 * flagged / len(prompts)
            by_judge[name]["flagged"] += flagged
        metrics["hs_by_set"][s] = by_judge[judge.name]["hs_by_set"][s]
        metrics["counts"][f"hs_{s}"] = len(prompts)
        metrics["seconds"][f"hs_{s}"] = round(time.time() - t0, 2)
        n_total += len(prompts)
    first = next(iter(hs_prompts), None)
    for entry in by_judge.values():
        flagged = entry.pop("flagged")
        if pool:
            entry["hs"] = 100.0 * flagged / n_total if n_total else None
        else:   # never pooled across sets: the headline is the first set's HS
            entry["hs"] = entry["hs_by_set"][first] if first is not None else None
    metrics["hs"] = by_judge[judge.name]["hs"]
    metrics["hs_pool"] = pool
    metrics["hs_set"] = None if pool else first
    metrics["hs_by_judge"] = by_judge
    metrics["judges"] = {judge.name: judge.describe(), **{name: j.describe() for name, j in seconds.items()}}

    if ecfg.harmless_n:
        t0 = time.time()
        prompts = harmless_prompts
        answers = backend.generate([Example(p) for p in prompts], ecfg.hs_max_new_tokens, desc="harmless")
        every_answer += answers
        refused = [is_refusal(a) for a in answers]
        _write_jsonl(out_dir / "samples_harmless.jsonl",
                     [{"prompt": p, "answer": a, "refusal": r} for p, a, r in zip(prompts, answers, refused)])
        metrics["over_refusal"] = 100.0 * sum(refused) / len(prompts)
        metrics["counts"]["harmless"] = len(prompts)
        metrics["seconds"]["harmless"] = round(time.time() - t0, 2)

    if task is not None and ecfg.fa_n != 0:
        t0 = time.time()
        n = ecfg.fa_n_by_task.get(task) if ecfg.fa_n is None else ecfg.fa_n
        rows = load_task(task, ecfg.fa_split, n, source=task_source)
        answers = backend.generate(rows, ecfg.fa_max_new_tokens_by_task[task], desc=f"FA {task}")
        every_answer += answers
        if task == alpaca_eval.TASK:   # FA = a judged win rate, or absent (fa_absent) without a judge
            metrics.update(alpaca_eval.alpaca_eval_fa(ecfg, rows, answers, out_dir))
        else:
            correct = [score(task, a, r.label, ecfg.fa_match) for a, r in zip(answers, rows)]
            _write_jsonl(out_dir / f"samples_fa_{task}.jsonl",
                         [{"input": r.input or r.instruction, "label": r.label, "answer": a, "correct": c}
                          for r, a, c in zip(rows, answers, correct)])
            metrics["fa"] = 100.0 * sum(correct) / len(rows)
        metrics["counts"][f"fa_{task}"] = len(rows)
        metrics["seconds"][f"fa_{task}"] = round(time.time() - t0, 2)
    refuse_empty_answers(every_answer, out_dir)
    return metrics


class EmptyAnswersError(RuntimeError):
    """Every answer of an evaluation is empty: its HS (100) and FA (0) would describe nothing."""


def refuse_empty_answers(answers: list[str], out_dir: Path) -> None:
    """Raise ``EmptyAnswersError`` when every one of ``answers`` is blank: a model that says nothing
    (non-finite weights, or an end-of-turn token first every time) gets no HS and no FA."""
    if answers and not any(a.strip() for a in answers):
        raise EmptyAnswersError(f"all {len(answers)} answers of the evaluation are empty (samples in {out_dir}): "
                                "the model generates nothing, so its HS would read 100 and its FA 0; this cell is "
                                "failed instead. Check the trained weights and the train log (train_log.jsonl)")
