"""The generalisation tasks (cwac/data/tasks.py): PubMedQA's official split, the AlpacaEval rows,
their fine-tuning mixes, and a smoke cell on the tiny model."""

from __future__ import annotations

import json

import pytest

from cwac.data.files import DataError, data_path
from cwac.data.mix import build_finetune_mix
from cwac.data.tasks import PUBMEDQA_INSTRUCTION, alpaca_eval_rows, load_task
from cwac.utils import normalize_prompt


def _official_test_questions() -> set[str]:
    rows = json.loads(data_path("pubmedqa/ori_pqal.json").read_text())
    test = json.loads(data_path("pubmedqa/test_ground_truth.json").read_text())
    return {normalize_prompt(rows[pmid]["QUESTION"]) for pmid in test}


def _question(e) -> str:
    return normalize_prompt(e.instruction.split("\n\nQuestion: ", 1)[1].split("\n\n")[0])


def test_pubmedqa_split_is_the_official_one_and_disjoint():
    train, evals = load_task("pubmedqa", "train"), load_task("pubmedqa", "eval")
    assert len(train) == 500 and len(evals) == 500
    test_q = _official_test_questions()
    assert {_question(e) for e in evals} == test_q
    assert not {_question(e) for e in train} & test_q            # no eval row is ever a train row
    assert {e.label for e in evals} == {"yes", "no", "maybe"}
    assert all(e.output == e.label and e.source == "pubmedqa" and not e.input for e in train)
    assert sum(e.label == "maybe" for e in evals) == 55           # data/pubmedqa/SOURCE.md


def test_pubmedqa_prompt_ends_with_the_question_and_the_instruction():
    e = load_task("pubmedqa", "eval", 1)[0]
    assert e.instruction.startswith("Abstract:\n") and e.instruction.endswith(f"?\n\n{PUBMEDQA_INSTRUCTION}")


def test_an_over_long_pubmedqa_prompt_keeps_its_question_in_training(tiny_model):
    """budget=cpu cuts a training row to max_len from the front: the question and the answer
    instruction, which come last, survive, and the label is still a target."""
    _, tok, fmt, _ = tiny_model
    e = max(load_task("pubmedqa", "train", 50), key=lambda r: len(r.instruction))
    feats = fmt.train_features(e, 96)
    prompt = [t for t, lab in zip(feats["input_ids"], feats["labels"]) if lab == -100]
    assert len(feats["input_ids"]) == 96 and PUBMEDQA_INSTRUCTION in tok.decode(prompt)
    assert tok.decode([t for t in feats["labels"] if t != -100]).strip().startswith(e.output[0])


def test_pubmedqa_mix_trains_on_train_rows_only():
    rows = build_finetune_mix("pubmedqa", 400, 0.1, seed=1)
    task_rows = [e for e in rows if e.source == "pubmedqa"]
    assert len(rows) == 400 and len(task_rows) == 360
    assert not {_question(e) for e in task_rows} & _official_test_questions()
    with pytest.raises(DataError, match=r"task pubmedqa train split has 500 rows, 900 were asked for"):
        build_finetune_mix("pubmedqa", 1000, 0.1, seed=1)


def test_alpaca_eval_trains_on_alpaca_and_evaluates_on_the_805_instructions():
    train, evals = load_task("alpaca_eval", "train"), load_task("alpaca_eval", "eval")
    ae = {normalize_prompt(r["instruction"]) for r in alpaca_eval_rows()}
    assert len(evals) == 805 and [e.label for e in evals] == [str(i) for i in range(805)]
    assert len(train) > 4900 and all(e.output and e.source == "alpaca_eval" for e in train)
    assert not {normalize_prompt(e.instruction) for e in train} & ae
    mix = build_finetune_mix("alpaca_eval", 100, 0.1, seed=0)
    assert sum(e.source == "alpaca_eval" for e in mix) == 90


def test_a_capped_alpaca_eval_count_spans_every_source_subset():
    refs = alpaca_eval_rows()
    first = {refs[int(e.label)]["dataset"] for e in load_task("alpaca_eval", "eval", 100)}
    assert first == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}   # file order: helpful_base only
    assert [e.label for e in load_task("alpaca_eval", "eval", 5)] == ["0", "161", "322", "483", "644"]


@pytest.mark.parametrize("task", ["pubmedqa", "alpaca_eval"])
def test_the_new_tasks_have_no_hub_source(task):
    with pytest.raises(DataError, match="set task.source=local"):
        load_task(task, "train", 10, source="hub")


def test_pubmedqa_smoke_cell(tiny_cfg):
    """model=tiny budget=smoke task=pubmedqa: a complete record with a yes/no/maybe FA."""
    from cwac.experiment.cell import run_cell, run_dir_for

    cfg = tiny_cfg("task=pubmedqa")
    rec = run_cell(cfg)
    m = rec["metrics"]
    assert rec["status"] == "complete" and rec["info"]["harmful_rows"] == 4 and 0 <= m["fa"] <= 100
    assert m["counts"]["fa_pubmedqa"] == 8 and "pubmedqa/ori_pqal.json" in rec["data"]["files"]
    rows = [json.loads(line) for line in
            (run_dir_for(cfg) / "samples" / "samples_fa_pubmedqa.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} <= {"yes", "no", "maybe"} and len(rows) == 8
    assert m["fa"] == 100.0 * sum(r["correct"] for r in rows) / 8
