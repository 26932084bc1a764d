"""The alignment stage: an artifact built once, reused by later runs, rebuilt on config change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cwac.alignment import alignment_rows, refusal_text
from cwac.artifacts import ArtifactStore
from cwac.data.harmful import EVAL_HARMFUL_SETS, prompt_set
from cwac.experiment.align import alignment_log
from cwac.experiment.cell import run_cell
from cwac.utils import normalize_prompt, stable_hash
from cwac.refusal import is_refusal


def _aligned_dirs(artifacts):
    return sorted(p for p in (artifacts / "aligned").iterdir() if (p / "artifact.json").exists())


def test_alignment_artifact_reused_then_rebuilt(tiny_cfg, tmp_path):
    artifacts = tmp_path / "own-artifacts"
    cfg = tiny_cfg("model.align=true", "stage=align", f"paths.artifacts={artifacts}")
    rec = run_cell(cfg)
    assert rec["status"] == "complete" and rec["stage"] == "align"
    first = _aligned_dirs(artifacts)
    assert len(first) == 1
    meta = ArtifactStore.meta(first[0])
    assert meta["meta"]["steps"] > 0 and meta["meta"]["method"] == "sft"
    # the record names the very weights it built (the key names only the recipe)
    weights = sorted(first[0].glob("*.safetensors"))
    assert weights and meta["meta"]["weights_sha256"] == hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
    assert rec["info"]["alignment"]["meta"]["weights_sha256"] == meta["meta"]["weights_sha256"]
    # the build's per-step rows live in the artifact, and the alignment record copies them
    built = alignment_log(first[0])
    assert [r["step"] for r in built] == list(range(1, meta["meta"]["steps"] + 1))
    assert built[0]["align/losses/total"] == meta["meta"]["loss_first"] and built[-1]["align/losses/total"] == meta["meta"]["loss_last"]
    logged = [json.loads(line) for line in (Path(rec["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert logged == built
    # a fine-tuning cell on the same model reuses the artifact (same folder, same build time)
    ft = run_cell(tiny_cfg("model.align=true", "method=sft", f"paths.artifacts={artifacts}"))
    assert ft["info"]["start_model"] == str(first[0])
    assert ArtifactStore.meta(first[0])["created"] == meta["created"]
    assert ft["info"]["base_model"] != ft["info"]["start_model"]
    # a changed recipe builds a second artifact
    run_cell(tiny_cfg("model.align=true", "stage=align", "alignment.n_harmful=12", f"paths.artifacts={artifacts}"))
    assert len(_aligned_dirs(artifacts)) == 2


def test_cell_that_builds_the_aligned_model_trains_like_one_that_reuses_it(tiny_cfg, tmp_path):
    """Building the aligned artifact in-process trains (and seeds) before fine-tuning; the cell must
    still start from its own seed, so the LoRA init and every loss match a cell that reuses it."""
    over = ("model.align=true", "method=sft", "training=lora", "eval.hs_n=2", "eval.harmless_n=0", "eval.fa_n=2",
            f"paths.artifacts={tmp_path / 'own-artifacts'}")
    cfg = tiny_cfg(*over)
    builds = run_cell(cfg)
    losses = [json.loads(line)["finetune/losses/total"]
              for line in (Path(builds["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    reuses = run_cell(tiny_cfg(*over, "skip_complete=false"))
    assert reuses["info"]["start_model"] == builds["info"]["start_model"]
    again = [json.loads(line)["finetune/losses/total"]
             for line in (Path(reuses["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) > 2 and again == losses


def test_alignment_prompts_are_disjoint_from_evaluation(tiny_cfg):
    cfg = tiny_cfg()
    rows = alignment_rows(cfg.alignment, seed=0)
    harmful = [r.instruction for r in rows if r.source == "refusal"]
    assert len(harmful) == cfg.alignment.n_harmful
    ev = {normalize_prompt(p) for s in EVAL_HARMFUL_SETS for p in prompt_set(s)}
    assert not ev & {normalize_prompt(p) for p in harmful}


def test_refusals_are_varied_deterministic_and_judged_as_refusals():
    prompts = list(prompt_set("advbench"))[:100]
    texts = [refusal_text(p, 0) for p in prompts]
    assert texts == [refusal_text(p, 0) for p in prompts]
    assert len(set(texts)) > 50
    assert all(is_refusal(t) for t in texts)


def test_too_few_short_alpaca_answers_is_a_clear_error(tiny_cfg):
    import pytest

    cfg = tiny_cfg("alignment.max_answer_chars=5", "alignment.n_harmless=600")
    with pytest.raises(ValueError, match=r"only \d+ Alpaca rows have answers of at most alignment.max_answer_chars=5"):
        alignment_rows(cfg.alignment, seed=0)


def test_alignment_key_follows_what_changes_the_aligned_weights(tiny_cfg):
    from cwac.alignment import alignment_key

    def key(*over):
        return stable_hash(alignment_key(tiny_cfg("model.align=true", *over), {"base": "b"}))

    ref = key()
    # the merged training node: values the recipe does not set itself still change the weights
    for over in ("training.weight_decay=0.1", "training.precision=bf16", "training.max_grad_norm=0.5",
                 "model.dtype=bfloat16", "model.system_prompt=Be brief.", "alignment.training.lr=5e-3",
                 "alignment.training.lr_schedule=cosine"):
        assert key(over) != ref, over
    # ... while the fine-tuning lr and schedule (the recipe sets its own), logging knobs and the settings
    # of a LoRA the stage does not use leave it, so a training=lora cell reuses the organism
    for over in ("training.lr=9e-4", "training.lr_schedule=cosine", "training.warmup_ratio=0.1",
                 "training.progress=false", "training.log_every=5", "training.lora.r=64",
                 "training.lora.target_modules=[q_proj]"):
        assert key(over) == ref, over


def test_alignment_only_prompt_sets_are_added_once_and_kept_off_evaluation_validation_and_small_mixes(tiny_cfg):
    import pytest

    from cwac.data.harmful import VALIDATION_HARMFUL_SETS, held_in_harmful_prompts

    sr = {normalize_prompt(p) for p in prompt_set("strongreject")}
    held_in = {normalize_prompt(p) for p in held_in_harmful_prompts()}
    # the alignment-only set is a separate source: not in the shared held-in pool, not in any evaluation
    # or validation set (rd_harmful_test lost exactly these rows)
    assert sr and not sr & held_in
    for s in EVAL_HARMFUL_SETS + VALIDATION_HARMFUL_SETS:
        assert not sr & {normalize_prompt(p) for p in prompt_set(s)}, s
    cfg = tiny_cfg("alignment.n_harmful=12", "alignment.extra_harmful_sets=[strongreject]")
    harmful = [normalize_prompt(r.instruction) for r in alignment_rows(cfg.alignment, seed=0) if r.source == "refusal"]
    assert len(harmful) == len(set(harmful)) == 12 + len(sr)
    assert sr <= set(harmful)
    # the BeaverTails-style alignment prompts: the CPU preset's attack mixes up to p = 0.2 (80 of n = 400
    # rows, the front of the pairs) never fine-tune on one, and the front validates
    from cwac.data.mix import build_finetune_mix

    back = {normalize_prompt(p) for p in prompt_set("beavertails_attack_back")}
    assert len(back) == 98 and not back & {normalize_prompt(p) for p in prompt_set("beavertails_attack_val")}
    mix = build_finetune_mix("sst2", 400, 0.2, seed=0)
    assert not back & {normalize_prompt(e.instruction) for e in mix if e.source == "beavertails"}
    with pytest.raises(ValueError, match=r"'harmbench_test' is not an alignment-only prompt set; valid: strongreject, beavertails_attack_back"):
        alignment_rows(tiny_cfg("alignment.extra_harmful_sets=[harmbench_test]").alignment, seed=0)


def test_the_organisms_artifact_keys_are_pinned():
    """The default config composes organism v6's aligned artifact (v5's recipe on packed batches);
    with padded batches it composes v5's, and v4's overrides compose v4's (docs/organism.md,
    "Versions at a glance"). A change to the recipe, the training node or the key function changes
    these on purpose only: that is a new organism version, rebuilt and re-validated."""
    from cwac.experiment.align import aligned_key
    from tests.conftest import compose

    assert stable_hash(aligned_key(compose())) == "14801266f769"
    assert stable_hash(aligned_key(compose("training.packing=false"))) == "a95a2e409ff6"
    assert stable_hash(aligned_key(compose("training.packing=false", "alignment.training.max_len=96",
                                           "alignment.n_harmless=1000"))) == "3f09bae342fe"
