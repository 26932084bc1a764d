"""AlpacaEval win rate (eval/alpaca_eval.py): wins counted through the order randomisation, a
judge built from config (stub classes registered for these tests, the tiny model), FA absent
without a judge, and bad settings refused before any model loads."""

from __future__ import annotations

import json

import pytest

import cwac.experiment.plugins  # noqa: F401  (registers the built-in pairwise judges)
from cwac.schema import ConfigError
from cwac.utils import compose_config
from eval.alpaca_eval import (PAIRWISE_JUDGES, CausalLMJudge, PairwiseJudge, check_settings, identifier_token_ids,
                              model_first, win_rate)


class AlwaysFirst(PairwiseJudge):
    """Prefers the output shown first (tag m), whatever it says."""

    name = "always_first"

    def __init__(self, weights: str = "stub", p: float = 1.0):
        self.weights, self.p = weights, float(p)

    def preference(self, instructions, outputs_1, outputs_2):
        return [self.p] * len(instructions)


class AlwaysSecond(AlwaysFirst):
    name = "always_second"

    def __init__(self, weights: str = "stub"):
        super().__init__(weights, 0.0)


class PrefersLonger(AlwaysFirst):
    """Prefers the longer output: the true quality signal the order must not hide."""

    name = "prefers_longer"

    def preference(self, instructions, outputs_1, outputs_2):
        return [1.0 if len(a) > len(b) else 0.0 for a, b in zip(outputs_1, outputs_2)]


N = 40
INSTR = [f"instruction {i}" for i in range(N)]
LONG = ["a long and detailed answer"] * N
SHORT = ["short"] * N


@pytest.fixture
def stub_judges(monkeypatch):
    """Register the stubs under their names for one test (the registry entry is removed after)."""
    monkeypatch.setattr(PAIRWISE_JUDGES, "_items", dict(PAIRWISE_JUDGES._items))   # drops the looked-up stubs after
    for cls in (AlwaysFirst, AlwaysSecond, PrefersLonger):
        monkeypatch.setitem(PAIRWISE_JUDGES._lazy, cls.name, f"{__name__}:{cls.__name__}")


def test_a_judge_that_always_prefers_the_first_output_wins_where_the_model_is_first():
    first = [model_first(i, 0) for i in range(N)]
    expected = 100.0 * sum(first) / N
    assert 0 < expected < 100                                          # the order is randomised
    res = win_rate(AlwaysFirst(), INSTR, SHORT, LONG, list(range(N)), "random", 0)
    assert res["win_rate"] == pytest.approx(expected) and res["wins"] == sum(first)
    assert res["losses"] == N - sum(first) and res["ties"] == 0
    assert [r["model_first"] for r in res["rows"]] == first
    assert win_rate(AlwaysSecond(), INSTR, SHORT, LONG, list(range(N)), "random", 0)["win_rate"] == \
        pytest.approx(100.0 - expected)


def test_both_orders_cancel_a_position_bias():
    for judge in (AlwaysFirst(), AlwaysSecond()):
        res = win_rate(judge, INSTR, SHORT, LONG, list(range(N)), "both", 0)
        assert res["win_rate"] == 50.0 and res["ties"] == N         # one win and one loss per pair


@pytest.mark.parametrize("order", ["random", "both"])
def test_a_real_preference_survives_the_order(order):
    """The judge's answer about the first/second slot is mapped back to the model's output."""
    idx = list(range(N))
    assert win_rate(PrefersLonger(), INSTR, LONG, SHORT, idx, order, 3)["win_rate"] == 100.0
    assert win_rate(PrefersLonger(), INSTR, SHORT, LONG, idx, order, 3)["win_rate"] == 0.0


def test_ties_count_half_and_the_weighted_rate_is_the_mean_probability():
    res = win_rate(AlwaysFirst(p=0.5), INSTR, SHORT, LONG, list(range(N)), "random", 0)
    assert res["win_rate"] == 50.0 and res["ties"] == N and res["win_rate_weighted"] == 50.0
    res = win_rate(AlwaysFirst(p=0.8), INSTR, SHORT, LONG, list(range(N)), "random", 0)
    first = sum(model_first(i, 0) for i in range(N))
    assert res["win_rate_weighted"] == pytest.approx(100.0 * (0.8 * first + 0.2 * (N - first)) / N)


def test_the_order_is_fixed_by_seed_and_index_not_by_the_subset():
    plan = [model_first(i, 0) for i in range(200)]
    assert plan == [model_first(i, 0) for i in range(200)]
    assert plan != [model_first(i, 1) for i in range(200)]
    sub = [7, 100, 33]
    rows = win_rate(AlwaysFirst(), INSTR[:3], SHORT[:3], LONG[:3], sub, "random", 0)["rows"]
    assert [r["model_first"] for r in rows] == [plan[i] for i in sub]


@pytest.fixture
def tiny_judge_dir(tiny_model, tmp_path):
    """The tiny Llama saved as a judge folder: a stand-in judge built from config."""
    model, tok, _, _ = tiny_model
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    return str(tmp_path / "judge")


def test_a_causal_lm_judge_reads_its_preference_from_the_identifier_tokens(tiny_judge_dir):
    judge = CausalLMJudge(tiny_judge_dir, batch_size=2, max_output_tokens=16, device="cpu")
    p = judge.preference(INSTR[:3], ["yes " * 40, "b", "c"], ["x", "a much longer answer here", "c"])
    assert len(p) == 3 and all(0.0 < v < 1.0 for v in p)
    assert p == judge.preference(INSTR[:3], ["yes " * 40, "b", "c"], ["x", "a much longer answer here", "c"])
    batched = judge.preference(INSTR[:3], ["yes " * 40, "b", "c"], ["x", "a much longer answer here", "c"])
    alone = [judge.preference([INSTR[i]], [o1], [o2])[0]
             for i, (o1, o2) in enumerate(zip(["yes " * 40, "b", "c"], ["x", "a much longer answer here", "c"]))]
    assert batched == pytest.approx(alone, abs=1e-5)                  # left padding does not move a preference
    m, big_m = (identifier_token_ids(judge.tok, s) for s in ("m", "M"))
    assert m and big_m and not set(m) & set(big_m)
    assert "m or M" in judge.prompt_text("do x", "A1", "B2") and judge.describe()["weights"] == tiny_judge_dir
    judge.close()
    assert judge.model is None


def _ae_cfg(tiny_cfg, *overrides):
    return tiny_cfg("task=alpaca_eval", *overrides)


@pytest.mark.parametrize("override,pattern", [
    ("eval.alpaca_eval.order=sometimes", r"config eval.alpaca_eval.order='sometimes' is not valid; valid values: random, both"),
    ("eval.alpaca_eval.reference=gpt5", r"config eval.alpaca_eval.reference='gpt5' is not valid; valid values: text_davinci_003"),
    ("eval.alpaca_eval.order_seed=-1", r"config eval.alpaca_eval.order_seed=-1 is not valid"),
    ("eval.alpaca_eval.judge_type=oracle", r"config eval.alpaca_eval.judge_type='oracle': unknown pairwise judge 'oracle'"),
    ("eval.alpaca_eval.judge=/no/such/judge", r"AlpacaEval judge weights folder /no/such/judge \(eval.alpaca_eval.judge\) does not exist"),
    ("eval.alpaca_eval.judge=someone/judge-7b", r"'someone/judge-7b' \(eval.alpaca_eval.judge\) is a hub id, and the run is offline"),
    ("eval.fa_split=heldout", r"task alpaca_eval has reference outputs for its eval rows only"),
])
def test_bad_settings_are_refused_naming_the_key(tiny_cfg, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_settings(_ae_cfg(tiny_cfg, override))


def test_a_bad_judge_fails_the_cell_before_any_model_loads(tiny_cfg, monkeypatch):
    from cwac.experiment import cell

    monkeypatch.setattr(cell, "load_chat_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    with pytest.raises(ConfigError, match="eval.alpaca_eval.judge"):
        cell.run_cell(_ae_cfg(tiny_cfg, "eval.alpaca_eval.judge=/no/such/judge"))


def test_other_tasks_carry_no_alpaca_eval_settings():
    """The AlpacaEval keys live in conf/task/alpaca_eval.yaml, so no other cell's config hash moved."""
    assert "alpaca_eval" not in compose_config().eval
    assert "alpaca_eval" not in compose_config().eval.fa_n_by_task


def _samples(rec) -> list[dict]:
    from pathlib import Path

    path = Path(rec["run_dir"]) / "samples" / "samples_fa_alpaca_eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_without_a_judge_the_fa_is_absent_with_the_reason(tiny_cfg):
    """model=tiny budget=smoke task=alpaca_eval: the outputs are stored, no FA is made up."""
    from cwac.experiment.cell import run_cell

    rec = run_cell(_ae_cfg(tiny_cfg))
    m = rec["metrics"]
    assert rec["status"] == "complete" and "fa" not in m and "eval.alpaca_eval.judge=null" in m["fa_absent"]
    assert m["alpaca_eval"]["judge"] is None and m["counts"]["fa_alpaca_eval"] == 8 and 0 <= m["hs"] <= 100
    rows = _samples(rec)
    assert len(rows) == 8 and {"instruction", "answer", "reference", "index"} <= set(rows[0])
    assert "p_model" not in rows[0]


def test_a_stub_judge_from_config_gives_the_expected_win_rate(tiny_cfg, stub_judges):
    """A smoke cell judged by a stub from config (eval.alpaca_eval.judge_type): FA = the share of
    the spread rows on which the model's output is shown first."""
    from cwac.experiment.cell import run_cell

    rec = run_cell(_ae_cfg(tiny_cfg, "eval.alpaca_eval.judge=stub", "eval.alpaca_eval.judge_type=always_first"))
    m = rec["metrics"]
    indices = [r["index"] for r in _samples(rec)]
    assert indices == [i * 805 // 8 for i in range(8)]               # spread over the subsets
    assert m["fa"] == pytest.approx(100.0 * sum(model_first(i, 0) for i in indices) / 8)
    assert m["alpaca_eval"]["win_rate"] == m["fa"] and m["alpaca_eval"]["judge"]["name"] == "always_first"
    assert "fa_absent" not in m


def _fa(tiny_cfg, tmp_path, *overrides):
    """``alpaca_eval_fa`` on made-up answers to 8 spread rows, with the ``eval`` node of a config."""
    from cwac.data.tasks import load_task
    from eval.alpaca_eval import alpaca_eval_fa

    rows = load_task("alpaca_eval", "eval", 8)
    return alpaca_eval_fa(_ae_cfg(tiny_cfg, *overrides).eval, rows, [f"answer {i}" for i in range(8)], tmp_path)


def test_both_orders_from_config(tiny_cfg, stub_judges, tmp_path):
    m = _fa(tiny_cfg, tmp_path, "eval.alpaca_eval.judge=stub", "eval.alpaca_eval.judge_type=always_first",
            "eval.alpaca_eval.order=both")
    assert m["fa"] == 50.0 and m["alpaca_eval"]["order"] == "both" and m["alpaca_eval"]["ties"] == 8


def test_the_tiny_model_as_judge_from_config(tiny_cfg, tiny_judge_dir, tmp_path):
    m = _fa(tiny_cfg, tmp_path, f"eval.alpaca_eval.judge={tiny_judge_dir}", "+eval.alpaca_eval.judge_options.device=cpu",
            "eval.alpaca_eval.reference=gpt4_1106_preview")
    info = m["alpaca_eval"]
    assert 0 <= m["fa"] <= 100 and info["judge"]["weights"] == tiny_judge_dir and info["reference"] == "gpt4_1106_preview"
    assert info["wins"] + info["ties"] + info["losses"] == 8
    rows = [json.loads(line) for line in (tmp_path / "samples_fa_alpaca_eval.jsonl").read_text().splitlines()]
    assert all(0 < r["p_model"] < 1 for r in rows) and rows[0]["answer"] == "answer 0"
