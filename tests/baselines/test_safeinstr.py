"""SafeInstr: safety rows (held-in harmful prompt -> refusal) are added to the mix, disjoint from
every evaluation set, sized by fraction or count, deterministic, and stored as an artifact."""

from __future__ import annotations

import pytest

from cwac.alignment import refusal_text
from cwac.data.harmful import EVAL_HARMFUL_SETS, prompt_set
from cwac.data.mix import build_finetune_mix
from cwac.utils import normalize_prompt
from tests.baselines.conftest import make_ctx, make_method


def test_safety_rows_are_added_disjoint_and_deterministic(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    rows = build_finetune_mix("sst2", 40, 0.1, seed=0)
    m = make_method("safeinstr", make_ctx(cfg, tok, fmt, tmp_path), fraction=0.25)
    out = m.build_train_data(rows)
    added = [e for e in out if e.source == "safety_refusal"]
    assert len(out) == 50 and len(added) == 10 and sorted(map(repr, rows)) == sorted(repr(e) for e in out if e not in added)
    assert all(e.output == refusal_text(e.instruction, 0) for e in added)
    banned = {normalize_prompt(p) for s in EVAL_HARMFUL_SETS for p in prompt_set(s)}
    assert not {normalize_prompt(e.instruction) for e in added} & banned
    again = make_method("safeinstr", make_ctx(cfg, tok, fmt, tmp_path), fraction=0.25).build_train_data(rows)
    assert again == out  # same rows, same order; the artifact was reused
    assert len(list((tmp_path / "safety_rows").glob("*/artifact.json"))) == 1
    assert m.record_info()["n_safety_rows"] == 10


def test_count_overrides_fraction_and_bad_values_fail(tiny_model, tmp_path):
    _, tok, fmt, cfg = tiny_model
    ctx = make_ctx(cfg, tok, fmt, tmp_path)
    assert make_method("safeinstr", ctx, count=3).n_safety(400) == 3
    assert make_method("safeinstr", ctx).n_safety(400) == 40  # default: 10% of the rows
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    with pytest.raises(ValueError, match="method.fraction=1.5 is not valid"):   # pre-flight
        check_settings(compose("model=tiny", "budget=smoke", "method=safeinstr", "method.fraction=1.5"))
    with pytest.raises(ValueError, match="held-in harmful prompts"):
        make_method("safeinstr", ctx, count=100000).build_train_data([])
