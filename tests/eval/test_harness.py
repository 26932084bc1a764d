"""The evaluation harness with a scripted backend: FA reads the same task source as training."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

import eval.harness as harness
from cwac.data.examples import Example
from eval.backends import GenerationBackend
from cwac.experiment.plugins import get_judge


class Scripted(GenerationBackend):
    name = "scripted"

    def generate(self, examples, max_new_tokens, desc="generate"):
        return ["positive"] * len(examples)


def test_fa_reads_the_task_source_that_fine_tuning_read(tmp_path, monkeypatch):
    seen = []

    def fake_load_task(name, split, n=None, source="local"):
        seen.append((name, split, n, source))
        return [Example("Classify.", input="great film", source=name, label="positive"),
                Example("Classify.", input="dull film", source=name, label="negative")]

    monkeypatch.setattr(harness, "load_task", fake_load_task)
    ecfg = OmegaConf.create({"hs_sets": [], "hs_pool": True, "hs_n": None, "hs_max_new_tokens": 4, "harmless_n": 0, "fa_n": 2,
                             "fa_n_by_task": {}, "fa_max_new_tokens_by_task": {"sst2": 4}, "fa_match": "exact",
                             "fa_split": "eval"})
    m = harness.evaluate(Scripted(), get_judge("keyword")(), ecfg, "sst2", tmp_path, task_source="hub")
    assert seen == [("sst2", "eval", 2, "hub")]
    assert m["fa"] == 50.0 and m["counts"]["fa_sst2"] == 2
    rows = [json.loads(line) for line in (tmp_path / "samples_fa_sst2.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False]


def test_a_capped_prompt_set_covers_every_category():
    """The BeaverTails-style set is 14 category blocks of 10; 100 prompts must reach all 14 (the
    first 100 stopped after 10), and a count equal to the set's size keeps it whole and in order."""
    from cwac.data.harmful import prompt_set

    full = list(prompt_set("beavertails_eval"))
    assert len(full) == 140
    picked = harness._take(full, 100)
    assert len(picked) == len(set(picked)) == 100
    assert {full.index(p) // 10 for p in picked} == set(range(14))
    assert harness._take(full, 140) == full and harness._take(full, None) == full


def test_fa_can_score_held_out_train_rows_instead_of_the_evaluation_rows(tmp_path):
    from cwac.data.mix import build_finetune_mix
    from cwac.data.tasks import load_task

    ecfg = OmegaConf.create({"hs_sets": [], "hs_pool": True, "hs_n": None, "hs_max_new_tokens": 4, "harmless_n": 0, "fa_n": 20,
                             "fa_n_by_task": {}, "fa_max_new_tokens_by_task": {"sst2": 4}, "fa_match": "exact",
                             "fa_split": "heldout"})
    harness.evaluate(Scripted(), get_judge("keyword")(), ecfg, "sst2", tmp_path)
    scored = [json.loads(line)["input"] for line in (tmp_path / "samples_fa_sst2.jsonl").read_text().splitlines()]
    train = load_task("sst2", "train")
    assert scored == [e.input for e in train[-20:]]
    trained = {e.input for e in build_finetune_mix("sst2", 400, 0.1, 0)}
    dev = {e.input for e in load_task("sst2", "eval")}
    assert not (set(scored) & trained) and not (set(scored) & dev)


def test_a_model_whose_answers_are_all_empty_is_refused_not_scored(tmp_path):
    """All-empty answers (NaN weights, or EOS first every time) would read HS 100 and FA 0; the
    evaluation fails instead, and one non-empty answer is enough to score."""
    import pytest

    class Silent(GenerationBackend):
        def __init__(self, speak_at=None):
            self.speak_at, self.n = speak_at, 0

        def generate(self, examples, max_new_tokens, desc="generate"):
            out = []
            for _ in examples:
                out.append("positive" if self.n == self.speak_at else "  ")
                self.n += 1
            return out

    ecfg = OmegaConf.create({"hs_sets": ["beavertails_eval"], "hs_pool": True, "hs_n": 4, "hs_max_new_tokens": 4, "harmless_n": 2,
                             "harmless_set": "rd_harmless_test", "fa_n": 2, "fa_n_by_task": {},
                             "fa_max_new_tokens_by_task": {"sst2": 4}, "fa_match": "exact", "fa_split": "eval"})
    judge = get_judge("keyword")()
    with pytest.raises(harness.EmptyAnswersError, match="all 8 answers of the evaluation are empty"):
        harness.evaluate(Silent(), judge, ecfg, "sst2", tmp_path)
    m = harness.evaluate(Silent(speak_at=7), judge, ecfg, "sst2", tmp_path)
    assert m["hs"] == 100.0 and m["fa"] == 0.0
