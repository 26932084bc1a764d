"""Organism versions never mix in a table and captions name them; the generalisation and
learning-rate tables; the other tables keep the setting's own learning rate."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from cwac.reports.build import build
from cwac.reports.organism import organism_key, organism_name
from cwac.utils import compose_config
from tests.cwac.reports.fake_runs import make_run, rate


def test_organism_key_is_the_aligned_artifact_and_vaccine_sits_with_its_recipe():
    plain = OmegaConf.to_container(compose_config(), resolve=True)
    vaccine = OmegaConf.to_container(compose_config("method=vaccine", "method@alignment.method=vaccine"), resolve=True)
    assert organism_key({"config": plain}) == "14801266f769"        # cwac.experiment.align.aligned_key's hash
    assert organism_key({"config": vaccine, "info": {"alignment": {"hash": "vaccine00000"}}}) == "14801266f769"
    assert organism_key({"config": plain, "info": {"alignment": {"hash": "stored000000"}}}) == "stored000000"
    assert organism_name("14801266f769") == "organism v6 (aligned artifact 14801266f769)"
    hub = {**plain, "model": {**plain["model"], "align": False}}
    assert organism_key({"config": hub}) == "none"


def test_two_organism_versions_never_share_a_table(tmp_path):
    runs = tmp_path / "runs"
    for s in (42, 43, 44):
        make_run(runs, method="sft", seed=s, flagged=rate(70))
        make_run(runs, method="cwac", seed=s, flagged=rate(10))
    make_run(runs, method="sft", seed=42, flagged=rate(99), organism="0123456789ab")    # an older organism
    res = build([runs], tmp_path / "results", make_plots=False)
    tables = [t for t in res["tables"] if t != "timings" and not t.startswith("degenerate")]
    assert len(tables) == 2 and "main" in tables and [t for t in tables if t.startswith("main-s")]
    main = (tmp_path / "results" / "tables" / "main.md").read_text()
    assert "| SmolLM2-135M | SFT | **90.0 ± 0.0** | 70.0 ± 0.0 | 3 |" in main                 # the 99 is not averaged in
    assert "Organism v6 (aligned artifact 14801266f769)" in main and "seeds 42, 43, 44" in main
    other = next((tmp_path / "results" / "tables").glob("main-s*.md")).read_text()
    assert "| SmolLM2-135M | SFT | 90.0 | 99.0 | 1 |" in other
    assert "aligned artifact 0123456789ab (no version name)" in other and "seeds 42." in other
    tex = (tmp_path / "results" / "tables" / "main.tex").read_text()
    assert "Organism v6 (aligned artifact 14801266f769)" in tex                          # LaTeX beside markdown


def test_generalisation_table_and_the_reason_ae_is_absent(tmp_path):
    runs = tmp_path / "runs"
    for m, k in (("sft", 60), ("cwac", 8)):
        for s in (42, 43):
            make_run(runs, method=m, seed=s, flagged=rate(70))
            make_run(runs, method=m, task="pubmedqa", seed=s, flagged=rate(k), correct=rate(55),
                     labels=["yes"] * 50 + ["no"] * 30 + ["maybe"] * 20)
            d = make_run(runs, method=m, task="alpaca_eval", seed=s, flagged=rate(k))
            rec = json.loads((d / "record.json").read_text())
            rec["metrics"]["fa"] = None
            rec["metrics"]["fa_absent"] = "no judge model (eval.alpaca_eval.judge=null)"
            (d / "record.json").write_text(json.dumps(rec))
    res = build([runs], tmp_path / "results", make_plots=False)
    assert {"main", "generalisation"} <= set(res["tables"])
    gen = (tmp_path / "results" / "tables" / "generalisation.md").read_text().splitlines()
    assert gen[2] == "| Model | Method | PubMedQA FA ↑ | PubMedQA HS ↓ | AlpacaEval AE ↑ | n |"
    assert gen[4] == "| SmolLM2-135M | SFT | **55.0 ± 0.0** | 60.0 ± 0.0 | – | 2 |"
    assert gen[5] == "|  | CWAC | **55.0 ± 0.0** | **8.0 ± 0.0** | – | 2 |"
    assert "AE is absent: no judge model (eval.alpaca_eval.judge=null)." in gen[-1]
    # the floor FA has to clear: the labels' shares, and what a constant majority answer scores
    assert ("PubMedQA's FA rows are labelled yes 50.0%, no 30.0%, maybe 20.0% (pooled over the records' samples): "
            'answering "yes" to every row scores 50.0.') in gen[-1]
    main = (tmp_path / "results" / "tables" / "main.md").read_text()
    assert "PubMedQA" not in main and "AlpacaEval" not in main


def test_lr_table_and_other_tables_keep_the_main_lr(tmp_path):
    runs = tmp_path / "runs"
    for s in (42, 43, 44):
        for lr, k in ((1e-5, 40), (2e-5, 70), (5e-5, 90)):
            make_run(runs, method="sft", seed=s, lr=lr, flagged=rate(k))
        make_run(runs, method="cwac", seed=s, flagged=rate(10))
    res = build([runs], tmp_path / "results", make_plots=False)
    assert sorted(res["tables"]) == ["degenerate", "lr-smollm2_135m-sst2", "main", "timings"]
    lr = (tmp_path / "results" / "tables" / "lr-smollm2_135m-sst2.md").read_text().splitlines()
    assert lr[2] == ("| Method | lr 1e-05 FA ↑ | lr 1e-05 HS ↓ | lr 2e-05 FA ↑ | lr 2e-05 HS ↓ | lr 5e-05 FA ↑ "
                     "| lr 5e-05 HS ↓ | n |")
    assert lr[4] == "| SFT | 90.0 ± 0.0 | 40.0 ± 0.0 | **90.0 ± 0.0** | 70.0 ± 0.0 | 90.0 ± 0.0 | 90.0 ± 0.0 | 3 |"
    assert lr[5] == "| CWAC | – | – | **90.0 ± 0.0** | **10.0 ± 0.0** | – | – | 3 |"
    main = (tmp_path / "results" / "tables" / "main.md").read_text()
    assert "| SmolLM2-135M | SFT | **90.0 ± 0.0** | 70.0 ± 0.0 | 3 |" in main                 # lr 2e-5 only
    assert "lr 2e-05" in main


def test_a_key_added_later_at_its_neutral_value_does_not_split_a_setting():
    """Records made before ``eval.hs_pool`` existed and records with its default (true) share a
    table; ``hs_pool: false`` (HS per set) is another setting (``cwac.records.HASH_NEUTRAL``)."""
    from cwac.reports.collect import setting_of

    old = {"eval": {"hs_n": 100}, "training": {"lr": 2e-5}}
    new = {"eval": {"hs_n": 100, "hs_pool": True}, "training": {"lr": 2e-5}}
    per_set = {"eval": {"hs_n": 100, "hs_pool": False}, "training": {"lr": 2e-5}}
    assert setting_of(old) == setting_of(new)
    assert setting_of(per_set) != setting_of(old)


def test_how_often_training_checkpoints_does_not_split_a_setting():
    """``training.checkpoint_minutes`` (cwac.resume) says how a run is saved, not what it computes:
    records before and after the key existed share a table, at any value."""
    from cwac.reports.collect import setting_of

    old = {"training": {"lr": 2e-5}, "alignment": {"training": {"lr": 3e-5}}}
    new = {"training": {"lr": 2e-5, "checkpoint_minutes": 20}, "alignment": {"training": {"lr": 3e-5, "checkpoint_minutes": 5}}}
    assert setting_of(old) == setting_of(new)
    assert setting_of(old) != setting_of({"training": {"lr": 2e-5, "weight_decay": 0.1}, "alignment": {"training": {"lr": 3e-5}}})
