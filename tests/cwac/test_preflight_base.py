"""The pre-flight refuses a ``model.base_path`` that is not ``model.path``'s own base: AsFT's and
SafeLoRA's V = W_inst - W_base silently include a pretraining delta otherwise (Mistral-7B-Instruct-v0.2
with the v0.1 base: equal shapes, rope_theta 1e6 vs 1e4, no sliding window vs 4096)."""

from __future__ import annotations

import json

import pytest

from cwac.experiment.preflight import ConfigError, base_config_differences, check_base_config, check_settings
from tests.conftest import compose

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 10000.0}


def _folder(tmp_path, name, **changes):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY, **changes}))
    return d


def _cfg(tmp_path, inst, base):
    return compose("model=llama2_7b_chat", f"model.path={inst}", f"model.base_path={base}", runs=tmp_path / "runs",
                   artifacts=tmp_path / "artifacts")


def test_a_base_with_another_rope_theta_is_refused(tmp_path):
    inst = _folder(tmp_path, "instruct", rope_theta=1.0e6)
    base = _folder(tmp_path, "base")
    with pytest.raises(ConfigError, match=r"model.base_path=.*not the base of model.path.*rope_theta: 1000000.0 in "
                                          r"model.path vs 10000.0 in model.base_path"):
        check_settings(_cfg(tmp_path, inst, base))
    same = _folder(tmp_path, "base_same", rope_theta=1.0e6)
    check_base_config(_cfg(tmp_path, inst, same))   # its own base passes


def test_differences_are_in_the_values_the_model_runs_with():
    v01 = {**TINY, "model_type": "mistral", "rope_theta": 1.0e4, "sliding_window": 4096}
    v02 = {**v01, "rope_theta": 1.0e6, "sliding_window": None}
    assert base_config_differences(v02, v01) == {"rope_theta": (1.0e6, 1.0e4), "sliding_window": (None, 4096)}
    implicit = {k: v for k, v in v01.items() if k != "sliding_window"}   # transformers' default window: 4096
    assert base_config_differences(v01, implicit) == {}
    assert base_config_differences(v02, implicit) == {"rope_theta": (1.0e6, 1.0e4), "sliding_window": (None, 4096)}
    assert base_config_differences(TINY, {**TINY, "intermediate_size": 256}) == {"intermediate_size": (128, 256)}
    no_theta = {k: v for k, v in TINY.items() if k != "rope_theta"}     # Llama's default theta is 1e4
    assert base_config_differences(TINY, no_theta) == {}


def test_unreadable_configs_are_not_compared_offline(tmp_path):
    inst = _folder(tmp_path, "instruct")
    cfg = compose("model=mistral_7b_instruct", f"model.path={inst}", runs=tmp_path / "runs")
    check_base_config(cfg)   # the base is a hub id that is not cached, and the run is offline: nothing to compare


def test_the_mistral_config_pairs_the_instruct_model_with_its_own_release():
    m = compose("model=mistral_7b_instruct").model
    assert m.path == "mistralai/Mistral-7B-Instruct-v0.3" and m.base_path == "mistralai/Mistral-7B-v0.3"
