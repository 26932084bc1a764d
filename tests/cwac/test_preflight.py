"""Every bad input is refused in seconds, before any model loads, by an error that names the config
key, the bad value and the valid values or the fix (``cwac.experiment.preflight``); the README's
"bad inputs" table is what the code prints."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import cwac.experiment.cell as cell
from cwac.data import files
from cwac.experiment.cell import run_cell, run_dir_for
from cwac.schema import CHOICES

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def no_model(monkeypatch):
    """Loading the start model (or building it) fails the test: every refusal must come first."""
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(cell, "start_model", loaded)
    monkeypatch.setattr(cell, "load_chat_model", loaded)


def refused(tiny_cfg, *overrides: str) -> str:
    """The message ``run_cell`` refuses ``overrides`` with (within 15 s, no model loaded)."""
    cfg = tiny_cfg(*overrides)
    t = time.time()
    with pytest.raises(Exception) as info:
        run_cell(cfg)
    assert not isinstance(info.value, AssertionError), info.value
    assert time.time() - t < 15
    return str(info.value)


BAD_CHOICES = [(key, "7" if key == "training.zero_stage" else "nope") for key in CHOICES]


@pytest.mark.parametrize("key,value", BAD_CHOICES, ids=[k for k, _ in BAD_CHOICES])
def test_every_enumerated_setting_is_refused_before_anything_is_written(tiny_cfg, no_model, tmp_path, key, value):
    msg = refused(tiny_cfg, f"{key}={value}")
    valid = ", ".join(str(v) for v in CHOICES[key])
    assert msg.startswith(f"config {key}=") and f"valid values: {valid}" in msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,pattern", [
    (["seed=abc"], r"config seed='abc' is not valid: it must be an integer in \[0, 2\*\*32\), e\.g\. seed=42"),
    (["seed=-1"], r"config seed=-1 is not valid"),
    (["harmful.n_total=0"], r"config harmful.n_total=0 is not valid: it must be an integer >= 1"),
    (["harmful.ratio=1.5"], r"config harmful.ratio=1.5 is not valid: it must be a finite number >= 0 and <= 1"),
    (["training.lr=0"], r"config training.lr=0 is not valid: it must be a finite number > 0"),
    (["training.max_steps=0"], r"config training.max_steps=0 is not valid: it must be an integer >= 1 or null"),
    (["eval.hs_n=0"], r"config eval.hs_n=0 is not valid"),
    (["threads=abc"], r"config threads='abc' is not valid"),
    (["offline=nope"], r"config offline='nope' is not valid: it must be true or false"),
    (["method.name=nope"], r"config method.name='nope': unknown method 'nope'; valid methods: .*sft"),
    (["judge.name=nope"], r"config judge.name='nope': unknown judge 'nope'; valid judges: .*keyword"),
    (["+judge.windoww=3"], r"config judge=keyword: .*windoww.*remove the key or fix its spelling"),
    (["method@alignment.method=cwac", "model.align=true"],
     r"config method@alignment.method='cwac' cannot run in the alignment stage \(it runs in: finetune\)"),
    (["model.source=hub"], r"config model.path is null but model.source=hub needs .* set model.path="),
    (["model=llama2_7b_chat"], r"model 'meta-llama/Llama-2-7b-chat-hf' \(model.path\) is a hub id, and the run is "
                               r"offline .*Fix: run with offline=false .* pass model.path=DIR"),
    (["judge=beaver_dam"], r"'PKU-Alignment/beaver-dam-7b' \(judge.weights\) is a hub id.*offline=false.*"
                           r"judge.weights=DIR, or use judge=keyword"),
])
def test_bad_settings_name_the_key_the_value_and_the_fix(tiny_cfg, no_model, tmp_path, overrides, pattern):
    assert re.search(pattern, refused(tiny_cfg, *overrides)), refused(tiny_cfg, *overrides)
    assert not (tmp_path / "runs").exists()


def test_a_runs_folder_that_cannot_be_made_is_refused(tiny_cfg, no_model, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = tiny_cfg()
    cfg.paths.runs = str(tmp_path / "a_file" / "runs")
    with pytest.raises(ValueError, match=r"config paths.runs=.*a_file.* is a file, not a folder; set paths.runs="):
        run_cell(cfg)


@pytest.mark.parametrize("overrides,pattern", [
    (["harmful.n_total=5000"], r"asks for 500 harmful rows .* has only 200 .*lower harmful.n_total"),
    (["harmful.n_total=2"], r"config harmful.n_total=2 gives 2 fine-tuning rows, fewer than one global batch of 4"),
    (["eval.hs_n=141"], r"eval.hs_n=141 but HS set 'beavertails_eval' has 140 prompts"),
    (["eval.fa_n=900"], r"config eval.fa_n=900 is too large: task sst2 eval split has 872 rows, 900 were asked for"),
])
def test_bad_sizes_fail_before_any_model_loads_with_a_failed_record(tiny_cfg, no_model, overrides, pattern):
    assert re.search(pattern, refused(tiny_cfg, *overrides))
    rec = json.loads((run_dir_for(tiny_cfg(*overrides)) / "record.json").read_text())
    assert rec["status"] == "failed" and re.search(pattern, rec["error"])


def test_a_corrupted_evaluation_file_fails_before_any_model_loads(tiny_cfg, no_model, monkeypatch):
    manifest = {**files._manifest(), "sst2/dev.tsv": "0" * 64}
    monkeypatch.setattr(files, "_manifest", lambda: manifest)
    monkeypatch.setattr(files, "_verified", {k: v for k, v in files._verified.items() if k != "sst2/dev.tsv"})
    assert re.search(r"sst2/dev.tsv has sha256 \w+, expected 0+: it was modified or corrupted; restore it from git",
                     refused(tiny_cfg))


def _readme_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    block = text.split("<!-- bad inputs: tests/cwac/test_preflight.py -->")[1].split("\n\n")[0]
    rows = [line.split(" | ") for line in block.strip().splitlines()[2:]]
    return [(a.strip("| `"), b.strip("| `")) for a, b in rows]


def test_the_readme_bad_inputs_table_is_what_the_code_prints(tiny_cfg, no_model):
    """Each row: the message starts with the row's text, and every piece after a "…" follows in order."""
    rows = _readme_rows()
    assert len(rows) >= 5
    for inp, shown in rows:
        msg = refused(tiny_cfg, *inp.split())
        first, *rest = [part.strip() for part in shown.split("…")]
        assert msg.startswith(first), (inp, first, msg)
        at = len(first)
        for part in filter(None, rest):
            at = msg.find(part, at)
            assert at >= 0, (inp, part, msg)


def test_the_enumerated_values_are_the_ones_the_code_accepts():
    from cwac.models import DTYPES
    from cwac.trainer import lr_lambda

    assert set(CHOICES["model.dtype"]) == set(DTYPES)
    for schedule in CHOICES["training.lr_schedule"]:
        lr_lambda(schedule, 0, 10)(5)
    with pytest.raises(ValueError):
        lr_lambda("nope", 0, 10)(5)


def test_asking_for_vllm_without_it_fails_before_any_model_loads(tiny_cfg, no_model, monkeypatch):
    import eval.vllm_backend

    monkeypatch.setattr(eval.vllm_backend, "probe", lambda python=None: (None, "vLLM is unavailable (test)"))
    assert re.search(r"config eval.backend=vllm but vLLM is unavailable \(test\); or use eval.backend=auto",
                     refused(tiny_cfg, "eval.backend=vllm"))


#: (overrides, the key the message names, the bad value) of each method's own settings (``Method.check_config``)
BAD_METHOD_SETTINGS = [
    (["method=booster"], "method@alignment.method", "sft"),
    (["method=tvaccine"], "method@alignment.method", "sft"),
    (["method=repnoise"], "method@alignment.method", "sft"),
    (["method=vaccine", "method@alignment.method=vaccine"], "model.align", "false"),
    (["model.align=true", "method@alignment.method=booster", "training.zero_stage=3"], "training.zero_stage", "3"),
    (["stage=align", "method@alignment.method=repnoise", "training.zero_stage=3"], "training.zero_stage", "3"),
    (["model.align=true", "method@alignment.method=booster", "alignment.method.lam=-1"], "alignment.method.lam", "-1"),
    (["model.align=true", "method@alignment.method=booster", "alignment.method.alpha=0"], "alignment.method.alpha", "0"),
    (["model.align=true", "method@alignment.method=booster", "alignment.method.harmful_batch_size=0"],
     "alignment.method.harmful_batch_size", "0"),
    (["model.align=true", "method@alignment.method=tvaccine", "alignment.method.interval=0"],
     "alignment.method.interval", "0"),
    (["model.align=true", "method@alignment.method=repnoise", "alignment.method.beta=-1"], "alignment.method.beta", "-1"),
    (["model.align=true", "method@alignment.method=vaccine", "alignment.method.norm=nope"],
     "alignment.method.norm", "'nope'"),
    (["method=asft", "model.align=true", "training.precision=fp16"], "training.precision", "fp16"),
    (["method=asft"], "model.base_path", "null"),
    (["method=asft", "model.align=true", "method.targets=[nope]"], "method.targets", "['nope']"),
    (["method=lisa", "training.precision=fp16"], "training.precision", "fp16"),
    (["method=lisa", "method.align_steps=0", "method.finetune_steps=0"], "method.align_steps", "0"),
    (["method=lisa", "method.finetune_steps=-1"], "method.finetune_steps", "-1"),
    (["method=safelora", "model.align=true", "method.k=1.5"], "method.k", "1.5"),
    (["method=safelora", "model.align=true", "method.select=top"], "method.select", "'top'"),
    (["method=ldifs", "method.reference=adapter_off"], "method.reference", "adapter_off"),
    (["method=ldifs", "method.rho=-1"], "method.rho", "-1"),
    (["method=ldifs", "training=lora", "method.reference_dtype=bfloat16"], "method.reference_dtype", "bfloat16"),
    (["method=antidote", "method.dense_ratio.full=0"], "method.dense_ratio.full", "0"),
    (["method=antidote", "training=lora", "method.dense_ratio.lora=1.0"], "method.dense_ratio.lora", "1.0"),
    (["method=antidote", "method.batch_size=0"], "method.batch_size", "0"),
    (["method=safeinstr", "method.fraction=1.5"], "method.fraction", "1.5"),
    (["method=safeinstr", "method.count=-1"], "method.count", "-1"),
]


@pytest.mark.parametrize("overrides,key,value", BAD_METHOD_SETTINGS, ids=[" ".join(o) for o, _, _ in BAD_METHOD_SETTINGS])
def test_bad_method_settings_fail_in_preflight_before_any_model_loads(tiny_cfg, no_model, tmp_path, overrides, key,
                                                                      value):
    """Each method's own check (``Method.check_config``) runs in ``check_settings``: the message names
    the key and the bad value, and nothing is written."""
    from cwac.experiment.preflight import check_settings

    msg = refused(tiny_cfg, *overrides)
    assert msg.startswith("config ") and f"{key}={value}" in msg, msg
    with pytest.raises(ValueError, match=re.escape(f"{key}={value}")):
        check_settings(tiny_cfg(*overrides))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides", [
    ["method=booster", "model.align=true", "method@alignment.method=booster"],
    ["method=vaccine", "model.align=true", "method@alignment.method=vaccine"],
    ["stage=align", "method@alignment.method=tvaccine"], ["stage=align", "method@alignment.method=repnoise"],
    ["method=asft", "model.align=true"], ["method=safelora", "model.align=true"], ["method=lisa"], ["method=ldifs"],
    ["method=ldifs", "training=lora"], ["method=antidote"], ["method=antidote", "training=lora"], ["method=safeinstr"],
])
def test_the_default_method_settings_pass_the_method_checks(tiny_cfg, overrides):
    from cwac.experiment.preflight import check_settings

    check_settings(tiny_cfg(*overrides))
