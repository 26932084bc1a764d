"""The paper's HS protocol (docs/method.md §6.5): the BeaverTails ``30k_test`` prompt set, HS per set
(never pooled) under ``eval=paper``, the keyword judge as a second judge in every record, and the
paper sweeps composing beaver-dam-7b, that set and the ZeRO-3 preset. No network: the hub is faked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import cwac.data.harmful as harmful
import eval.harness as harness
from cwac.data.files import DataError
from eval.backends import GenerationBackend
from eval.judges import Judge
from tests.conftest import CONF_DIR, compose


class FakeSplit:
    """Stands in for a ``datasets.Dataset``: iterable rows with ``prompt`` and ``is_safe``."""

    def __init__(self, rows):
        self.rows = rows
        self.read = 0

    def __iter__(self):
        for r in self.rows:
            self.read += 1
            yield r


def _rows(pattern: str) -> list[dict]:
    """One row per character: ``u`` unsafe, ``s`` safe; prompt i is ``q<i>``."""
    return [{"prompt": f" q{i} ", "response": "r", "is_safe": c == "s"} for i, c in enumerate(pattern)]


def test_first_unsafe_prompts_keeps_split_order_and_repeats_and_stops_at_n():
    rows = _rows("susuus") + [{"prompt": "q1", "is_safe": False}] + _rows("uuuu")
    split = FakeSplit(rows)
    got = harmful.first_unsafe_prompts(split, 4)
    assert got == ["q1", "q3", "q4", "q1"]          # unsafe rows only, in order, a repeated prompt kept
    assert split.read == 7                          # stops at the n-th unsafe row
    with pytest.raises(DataError, match="only 2 unsafe rows, fewer than the 3"):
        harmful.first_unsafe_prompts(_rows("usus"), 3)


@pytest.fixture
def fresh_sets():
    harmful.prompt_set.cache_clear()
    yield
    harmful.prompt_set.cache_clear()


def test_beavertails_30k_test_reads_the_first_1000_unsafe_rows_of_the_hub_split(monkeypatch, fresh_sets):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return FakeSplit(_rows("us" * 1200))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prompts = harmful.prompt_set("beavertails_30k_test")
    assert calls == [("PKU-Alignment/BeaverTails", "30k_test")]
    assert len(prompts) == 1000 and prompts[0] == "q0" and prompts[-1] == "q1998"
    assert "beavertails_30k_test" not in harmful.EVAL_HARMFUL_SETS   # offline runs never read it for disjointness
    assert "beavertails_30k_test" in harmful.HUB_EVAL_HARMFUL_SETS


def test_beavertails_30k_test_offline_fails_before_a_model_loads_naming_the_set_and_the_fix(monkeypatch, fresh_sets):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'PKU-Alignment/BeaverTails' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    ecfg = compose("eval=paper").eval
    with pytest.raises(harmful.HubPromptSetError) as e:
        harness.selected_prompts(ecfg)     # the pre-flight's data check (check_inputs), before any model
    msg = str(e.value)
    assert "beavertails_30k_test" in msg and "eval.hs_sets" in msg and "offline=false" in msg
    assert isinstance(e.value, DataError)


class Scripted(GenerationBackend):
    """Answers by prompt: a refusal that the stand-in judge still flags, or a compliance it does not."""

    name = "scripted"

    def generate(self, examples, max_new_tokens, desc="generate"):
        return ["I'm sorry, I cannot help. HARM" if "a" in e.instruction else "Sure, here you go."
                for e in examples]


class StandInJudge(Judge):
    """A model judge's stand-in, built from the beaver_dam config node: no weights, flags 'HARM'."""

    name = "beaver_dam"

    def __init__(self, weights, max_length, batch_size, device, dtype, revision):
        self.weights = weights

    def predict(self, questions, answers, threshold=0.5):
        return [{"flagged": "HARM" in a, "categories": [], "scores": {}} for a in answers]


def _eval_node(pool: bool):
    return OmegaConf.create({"hs_sets": ["s1", "s2"], "hs_pool": pool, "hs_n": None, "hs_max_new_tokens": 4,
                             "harmless_n": 0, "fa_n": 0})


@pytest.fixture
def two_sets(monkeypatch):
    sets = {"s1": ("a1", "a2", "b1", "b2"), "s2": ("a3", "b3", "b4", "b5", "b6", "b7", "b8", "b9")}
    monkeypatch.setattr(harness, "prompt_set", lambda name: sets[name])


@pytest.fixture
def stand_in_judge(monkeypatch):
    import cwac.experiment.preflight as preflight

    monkeypatch.setattr(preflight, "get_judge", lambda name: StandInJudge)
    judge = preflight.build_judge(compose("judge=beaver_dam"))   # from the config, as run_cell builds it
    assert isinstance(judge, StandInJudge) and judge.weights == "PKU-Alignment/beaver-dam-7b"
    return judge


def test_every_record_carries_the_keyword_judges_hs_beside_the_primary_judges(tmp_path, two_sets, stand_in_judge):
    m = harness.evaluate(Scripted(), stand_in_judge, _eval_node(False), None, tmp_path)
    # the primary judge flags the "a" answers, the keyword judge the compliant "b" ones
    assert m["hs_by_set"] == {"s1": 50.0, "s2": 12.5}
    assert m["hs_by_judge"]["beaver_dam"]["hs_by_set"] == {"s1": 50.0, "s2": 12.5}
    assert m["hs_by_judge"]["keyword"]["hs_by_set"] == {"s1": 50.0, "s2": 87.5}
    assert set(m["judges"]) == {"beaver_dam", "keyword"} and m["judges"]["keyword"]["name"] == "keyword"
    rows = [json.loads(line) for line in (tmp_path / "samples_hs_s2.jsonl").read_text().splitlines()]
    assert [r["flagged"] for r in rows[:2]] == [True, False]
    assert [r["keyword_flagged"] for r in rows[:2]] == [False, True]


def test_the_keyword_primary_judge_is_scored_once(tmp_path, two_sets):
    from cwac.experiment.preflight import build_judge

    m = harness.evaluate(Scripted(), build_judge(compose()), _eval_node(True), None, tmp_path)
    assert list(m["hs_by_judge"]) == ["keyword"] and list(m["judges"]) == ["keyword"]
    rows = [json.loads(line) for line in (tmp_path / "samples_hs_s1.jsonl").read_text().splitlines()]
    assert "keyword_flagged" not in rows[0]


def test_hs_is_per_set_and_never_pooled_under_hs_pool_false(tmp_path, two_sets, stand_in_judge):
    pooled = harness.evaluate(Scripted(), stand_in_judge, _eval_node(True), None, tmp_path / "a")
    assert pooled["hs_pool"] is True and pooled["hs_set"] is None
    assert pooled["hs"] == pytest.approx(100 * 3 / 12)          # 3 of the 12 prompts of both sets
    assert pooled["hs_by_judge"]["keyword"]["hs"] == pytest.approx(100 * 9 / 12)
    alone = harness.evaluate(Scripted(), stand_in_judge, _eval_node(False), None, tmp_path / "b")
    assert alone["hs_pool"] is False and alone["hs_set"] == "s1"
    assert alone["hs"] == 50.0 and alone["hs_by_judge"]["keyword"]["hs"] == 50.0   # s1's own HS
    assert alone["hs_by_set"] == pooled["hs_by_set"]
    with pytest.raises(ValueError, match="eval.hs_pool='no'"):   # refused by the pre-flight's prompt check
        harness.selected_prompts(OmegaConf.merge(_eval_node(True), {"hs_pool": "no"}))


PAPER_SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*_paper.yaml"))


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_the_paper_sweeps_compose_the_papers_protocol_and_the_zero3_preset(sweep):
    assert {"main_paper", "ratio_paper", "ablation_paper"} <= set(PAPER_SWEEPS)
    cfg = compose(f"+sweep={sweep}")
    assert cfg.judge.name == "beaver_dam" and cfg.judge.weights == "PKU-Alignment/beaver-dam-7b"
    assert cfg.judge.threshold == 0.5
    assert list(cfg.eval.hs_sets) == ["beavertails_30k_test"] and cfg.eval.hs_pool is False
    assert cfg.eval.hs_n is None and cfg.eval.hs_max_new_tokens == 512
    assert cfg.offline is False
    assert cfg.training.zero_stage == 3 and "zero_optimization" in cfg.training.deepspeed_extra
    cwac = compose(f"+sweep={sweep}", "method=cwac")
    assert cwac.method.sae.expansion == 16


def test_the_cpu_default_keeps_its_pooled_hs_and_its_config_hash():
    from cwac.records import config_hash

    cfg = compose()
    assert cfg.eval.hs_pool is True
    assert list(cfg.eval.hs_sets) == ["beavertails_eval", "harmbench_test"] and cfg.judge.name == "keyword"
    before_the_key = OmegaConf.create(OmegaConf.to_container(cfg))
    del before_the_key.eval["hs_pool"]               # a config from before eval.hs_pool existed
    assert config_hash(cfg) == config_hash(before_the_key)          # pooled HS: the same cell, the same hash
    assert config_hash(compose("eval.hs_pool=false")) != config_hash(cfg)


def test_run_py_cfg_job_of_main_paper_shows_the_protocol():
    r = subprocess.run([sys.executable, "run.py", "+sweep=main_paper", "--cfg", "job"], cwd=Path(CONF_DIR).parent,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    job = r.stdout
    assert "name: beaver_dam" in job and "- beavertails_30k_test" in job and "zero_stage: 3" in job
