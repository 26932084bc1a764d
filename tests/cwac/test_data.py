"""Data layer: real files, mixes, clear errors, disjointness."""

from __future__ import annotations

import json

import pytest

from cwac.data import files
from cwac.data.files import DataError, read_csv, read_json_list, read_jsonl
from cwac.data.harmful import (EVAL_HARMFUL_SETS, assert_disjoint, beavertails_pairs, held_in_harmful_prompts,
                               prompt_set)
from cwac.data.mix import build_finetune_mix
from cwac.data.tasks import load_task
from cwac.utils import normalize_prompt


def test_task_splits_have_protocol_sizes_and_labels():
    assert len(load_task("sst2", "eval")) == 872
    assert len(load_task("agnews", "eval", 1000)) == 1000
    assert len(load_task("gsm8k", "eval", 1000)) == 1000
    sst = load_task("sst2", "train", 50)
    assert {e.output for e in sst} == {"positive", "negative"} and all(e.input for e in sst)
    ag = load_task("agnews", "train", 200)
    assert {e.label for e in ag} <= {"World", "Sports", "Business", "Sci/Tech"}
    g = load_task("gsm8k", "train", 3)
    assert all("The final answer is: " in e.output and "####" not in e.output for e in g)


def test_mix_sizes_and_determinism():
    a = build_finetune_mix("sst2", 100, 0.2, seed=1)
    b = build_finetune_mix("sst2", 100, 0.2, seed=1)
    c = build_finetune_mix("sst2", 100, 0.2, seed=2)
    assert len(a) == 100 and sum(e.source == "beavertails" for e in a) == 20
    assert a == b and a != c
    assert sorted(map(str, a)) == sorted(map(str, c))  # same rows, other order
    assert sum(e.source == "beavertails" for e in build_finetune_mix("sst2", 100, 0.0, seed=1)) == 0


def test_mix_never_trains_on_an_evaluation_prompt():
    from cwac.data.examples import Example
    from cwac.data.harmful import prompt_set

    leaked = Example(prompt_set("harmbench_test")[3], "", "a harmful answer", "beavertails")
    pool = [leaked] + beavertails_pairs()[:20]
    rows = build_finetune_mix("sst2", 100, 0.2, seed=1, harmful_pool=pool)
    assert leaked not in rows and sum(e.source == "beavertails" for e in rows) == 20
    with pytest.raises(DataError, match="after removing 1 evaluation prompts"):
        build_finetune_mix("sst2", 105, 0.2, seed=1, harmful_pool=pool)   # 21 asked, 20 left


def test_too_many_harmful_rows_says_how_many_exist():
    n = len(beavertails_pairs())
    assert n == 200
    with pytest.raises(DataError, match=r"asks for 500 harmful rows.*has only 200"):
        build_finetune_mix("sst2", 5000, 0.1, seed=0)


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"other": 1, "prompt": None}], indent=1))
    with pytest.raises(DataError, match=r"x.json, line 5 \(item 2 of the list\): missing or null field\(s\) "
                                        r"\['prompt'\] \(fields present: \['other'\]\)"):
        read_json_list(p, ["prompt"])
    j = tmp_path / "x.jsonl"
    j.write_text('{"q": "a"}\n\n{"q": " "}\n')
    with pytest.raises(DataError, match=r"x.jsonl, line 3: empty text in field\(s\) \['q'\]"):
        read_jsonl(j, ["q"], nonempty=["q"])
    c = tmp_path / "y.csv"
    c.write_text("goal,target\nok,fine\nbad,row,extra\n")
    with pytest.raises(DataError, match=r"y.csv, line 3: too many fields"):
        read_csv(c, ["goal", "target"])
    c.write_text('goal,target\n"a quoted\nfield over two lines",fine\nbad,row,extra\n')
    with pytest.raises(DataError, match=r"y.csv, line 4: too many fields"):   # physical lines, not records
        read_csv(c, ["goal", "target"])
    with pytest.raises(DataError, match="does not exist"):
        files.data_path("nope/missing.csv")


def test_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\nedited\t1\n")
    (root / "MANIFEST.json").write_text(json.dumps({"sst2/dev.tsv": "0" * 64}))
    monkeypatch.setattr(files, "DATA_ROOT", root)
    files._manifest.cache_clear()
    files._verified.clear()
    try:
        with pytest.raises(DataError, match="modified or corrupted"):
            files.data_path("sst2/dev.tsv")
    finally:
        files._manifest.cache_clear()
        files._verified.clear()


def test_held_in_harmful_prompts_are_disjoint_from_every_eval_set():
    held = held_in_harmful_prompts()
    assert len(held) > 500
    ev = {normalize_prompt(p) for s in EVAL_HARMFUL_SETS for p in prompt_set(s)}
    assert not ev & {normalize_prompt(p) for p in held}
    with pytest.raises(AssertionError, match="also appear in evaluation set"):
        assert_disjoint([prompt_set("harmbench_test")[0]])


def test_heldout_split_needs_a_count_that_leaves_the_front_for_training():
    with pytest.raises(ValueError, match="needs a row count"):
        load_task("sst2", "heldout")
    n = len(load_task("sst2", "train"))
    with pytest.raises(DataError, match="at most half"):
        load_task("sst2", "heldout", n // 2 + 1)


@pytest.fixture
def own_data(tmp_path, monkeypatch):
    """``own_data({rel: text})``: a data root holding these files (and a MANIFEST with their
    checksums) in place of data/; the readers' caches are restored afterwards."""
    from cwac.utils import file_sha256

    saved = dict(files._verified)

    def make(contents: dict[str, str]):
        root = tmp_path / "data"
        for rel, text in contents.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "MANIFEST.json").write_text(json.dumps({rel: file_sha256(root / rel) for rel in contents}))
        monkeypatch.setattr(files, "DATA_ROOT", root)
        files._manifest.cache_clear()
        files._verified.clear()
        prompt_set.cache_clear()
        return root

    yield make
    files._manifest.cache_clear()
    files._verified.clear()
    files._verified.update(saved)
    prompt_set.cache_clear()


def test_an_empty_sst2_sentence_names_the_file_and_line(own_data):
    own_data({"sst2/train.tsv": "sentence\tlabel\ngood film \t1\n  \t0\n"})
    with pytest.raises(DataError, match=r"sst2/train.tsv, line 3: empty text in field\(s\) \['sentence'\]"):
        load_task("sst2", "train")


def test_an_empty_beavertails_prompt_or_answer_names_the_file_and_line(own_data):
    def pair(prompt, answer, flag="unsafe"):
        return {"instruction": f"Intro\n\n### Instruction:\n{prompt}\n\n### Response:", "output": answer, "flag": flag}

    rel = "beavertails_derived/train_merged_n1000_p0.2.json"
    own_data({rel: json.dumps([pair("How do I pick a lock?", "Like this."), pair(" ", "Sure.")], indent=2)})
    with pytest.raises(DataError, match=r"line 7 \(item 2 of the list\): empty prompt between"):
        beavertails_pairs()
    own_data({rel: json.dumps([pair("q", "a"), pair("q2", "", "safe"), pair("q3", " ")], indent=2)})
    with pytest.raises(DataError, match=r"item 3 of the list\): empty text in field\(s\) \['output'\]"):
        beavertails_pairs()   # an empty answer of a safe row (never trained on) is not an error
