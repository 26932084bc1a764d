"""The four claims on synthetic records: each verdict flips when the data flips, the interval
accounts for prompts and seeds, evidence shows the prompts where CWAC answers and a baseline
refuses, and a claim without records says "not run"."""

from __future__ import annotations

import pytest

from cwac.reports import claims as C
from cwac.reports.claims import FAILS, HOLDS, NOT_RUN, TIE, check_claims, claims_markdown, paired_bootstrap
from cwac.reports.collect import load_results
from tests.cwac.reports.fake_runs import make_run, rate

SEEDS = (42, 43, 44)


def _claims(root):
    results, _ = load_results([root])
    return {c.key: c for c in check_claims(results)}


def _table(root, hs: dict[str, int], fa: dict[str, int] | None = None, p: float = 0.1, seeds=SEEDS):
    """Every method in ``hs`` with that many flagged HS prompts of 100 (and FA rows correct)."""
    for m, k in hs.items():
        for s in seeds:
            make_run(root, method=m, p=p, seed=s, flagged=rate(k, offset=s),
                     correct=rate((fa or {}).get(m, 90)))


@pytest.mark.parametrize("cwac_hs, verdict", [(10, HOLDS), (80, FAILS), (45, TIE)])
def test_claim_a_flips_with_the_data(tmp_path, cwac_hs, verdict):
    _table(tmp_path, {"sft": 70, "asft": 45, "cwac": cwac_hs})
    a = _claims(tmp_path)["a"]
    assert a.verdict == verdict
    assert {c.b for c in a.comparisons} == {"SFT", "AsFT"}
    assert "SafeInstr" in " ".join(a.missing)                      # the baselines without records are listed


def test_failing_claim_shows_cwac_answering_where_the_baseline_refuses(tmp_path):
    _table(tmp_path, {"sft": 20, "cwac": 60})
    a = _claims(tmp_path)["a"]
    (cmp,) = a.comparisons
    assert cmp.verdict == FAILS and cmp.evidence
    for ev in cmp.evidence:
        assert ev["cwac"].startswith("Sure") and ev["other"] == "I cannot help."
    md = claims_markdown(list(_claims(tmp_path).values()), "ctx")
    assert "### (a) CWAC's HS is below SFT's and below every baseline's: fails" in md
    assert "CWAC answers (flagged), SFT refuses" in md and "“I cannot help.”" in md
    assert "s42: 60.0 / 20.0; s43: 60.0 / 20.0; s44: 60.0 / 20.0 (CWAC / SFT)" in md   # the per-seed numbers


@pytest.mark.parametrize("cwac_fa, verdict", [(90, HOLDS), (60, FAILS)])
def test_claim_b_fa_within_one_point(tmp_path, cwac_fa, verdict):
    _table(tmp_path, {"sft": 70, "cwac": 10}, fa={"sft": 90, "cwac": cwac_fa})
    b = _claims(tmp_path)["b"]
    assert b.verdict == verdict and b.comparisons[0].kind == "within"
    if verdict == FAILS:
        assert all(ev["cwac"] == "negative" and ev["other"] == "positive" for ev in b.comparisons[0].evidence)


def test_claim_b_noisy_difference_is_a_tie(tmp_path):
    for s in SEEDS:   # one point apart on average, different rows wrong: the interval straddles ±1
        make_run(tmp_path, method="sft", seed=s, correct=rate(80, offset=s))
        make_run(tmp_path, method="cwac", seed=s, correct=rate(81, offset=s + 50))
    assert _claims(tmp_path)["b"].verdict == TIE


@pytest.mark.parametrize("variant_hs, verdict", [(60, HOLDS), (5, FAILS)])
def test_claim_c_variants_worse_than_cwac(tmp_path, variant_hs, verdict):
    _table(tmp_path, {"cwac": 20, "cwac_weight_only": variant_hs, "cwac_act_only": variant_hs})
    c = _claims(tmp_path)["c"]
    assert c.verdict == verdict and len(c.comparisons) == 2


@pytest.mark.parametrize("grows, verdict", [(True, HOLDS), (False, FAILS)])
def test_claim_d_hs_grows_with_p_and_cwac_lowest(tmp_path, grows, verdict):
    for i, p in enumerate((0.05, 0.1, 0.5)):
        step = 15 * i if grows else -15 * i
        _table(tmp_path, {"sft": 60 + step, "cwac": 30 + step}, p=p)
    d = _claims(tmp_path)["d"]
    assert d.verdict == verdict
    growth = [c for c in d.comparisons if "vs 0.05" in c.label]
    assert len(growth) == 2 and all(c.verdict == verdict for c in growth)


def test_claim_d_fails_when_a_baseline_is_below_cwac_at_some_p(tmp_path):
    for i, p in enumerate((0.05, 0.5)):
        _table(tmp_path, {"sft": 40 + 40 * i, "cwac": 30 + 30 * i}, p=p)
    make_run(tmp_path, method="asft", p=0.5, seed=42, flagged=rate(10))
    d = _claims(tmp_path)["d"]
    assert d.verdict == FAILS
    (bad,) = [c for c in d.comparisons if c.verdict == FAILS]
    assert bad.label == "SST-2, p = 0.5: AsFT" and bad.evidence


def test_no_records_is_not_run(tmp_path):
    claims = check_claims([])
    assert [c.verdict for c in claims] == [NOT_RUN] * 4
    md = claims_markdown(claims, "ctx")
    assert md.count("**not run**") == 4 and "Not run: no records" in md


def test_interval_accounts_for_seeds_as_well_as_prompts(tmp_path):
    # Each seed's difference is the same on every prompt (no prompt noise), but differs between seeds:
    # only the seed level of the bootstrap can widen the interval.
    for s, k in zip(SEEDS, (10, 30, 50)):
        make_run(tmp_path, method="sft", seed=s, flagged=[True] * 100)
        make_run(tmp_path, method="cwac", seed=s, flagged=rate(100 - k))
    results, _ = load_results([tmp_path])
    cw = [r for r in results if r.method == "cwac"]
    sft = [r for r in results if r.method == "sft"]
    est = paired_bootstrap(cw, sft, "hs")
    assert est.diff == pytest.approx(30.0)
    assert est.lo < 20 and est.hi > 40                       # seed spread (10..50) shows in the interval
    assert paired_bootstrap(cw, sft, "hs").lo == est.lo      # fixed RNG seed: reproducible


def test_prompt_noise_widens_a_single_seed_interval(tmp_path, monkeypatch):
    make_run(tmp_path, method="sft", seed=42, flagged=rate(50))
    make_run(tmp_path, method="cwac", seed=42, flagged=rate(40, offset=30))
    results, _ = load_results([tmp_path])
    est = paired_bootstrap([r for r in results if r.method == "cwac"], [r for r in results if r.method == "sft"], "hs")
    assert est.diff == pytest.approx(10.0) and est.prompt_level and est.n_items == 100
    assert est.lo < 0 < est.hi                               # 10 points on 100 prompts is within noise
    monkeypatch.setattr(C, "N_BOOT", 500)
    est2 = paired_bootstrap([r for r in results if r.method == "cwac"], [r for r in results if r.method == "sft"], "hs")
    assert est2.diff == est.diff
