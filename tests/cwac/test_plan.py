"""The memory plan (``cwac.memory``, ``python -m cwac.plan``) against hand arithmetic on the tiny
model's shapes, each method's own tensors, the paper models' parameter counts, and a layout that
does not fit."""

from __future__ import annotations

import json

import pytest

from cwac.memory import GIB, PlanSpec, build_plan, finetune_components, key, parse_key
from tests.conftest import compose

# tiny (conf/model/tiny.yaml): d 128, d_ff 256, 2 layers, 4 heads of 32, 2 kv heads, vocab 1024, untied
LAYER = (128 * 128 + 64 * 128 + 64 * 128 + 128 * 128) + 3 * 256 * 128 + 2 * 128   # attention + MLP + 2 norms
P = 1024 * 128 + 2 * LAYER + 128 + 1024 * 128                                   # embed, layers, norm, head


def plan_cfg(*overrides: str):
    return compose("model=tiny", "budget=smoke", "+plan=default", *overrides)


@pytest.fixture(scope="module")
def tiny_shapes():
    from cwac.plan import model_shapes

    return model_shapes(plan_cfg())


def spec(shapes, **kw) -> PlanSpec:
    return PlanSpec(shapes=shapes, **{"dtype_bytes": 4, "micro_batch": 1, "seq_len": 16, **kw})


def by_name(comps, where=None) -> dict[str, int]:
    return {c.name: c.bytes for c in comps if where is None or c.where == where}


def test_tiny_shapes_are_counted_on_the_meta_device(tiny_shapes):
    s = tiny_shapes
    assert (s.n_params, s.layer_params, s.embed_params, s.head_params) == (P, LAYER, 1024 * 128, 1024 * 128)
    assert (s.d_model, s.d_ff, s.n_layers, s.n_kv_heads, s.head_dim, s.tied) == (128, 256, 2, 2, 32, False)
    assert s.linear("k_proj") == (64, 128) and s.linear("down_proj") == (128, 256)
    assert s.linear_params == 2 * (LAYER - 256)


def test_zero0_fp32_is_16_bytes_per_parameter_plus_the_allreduce_buffer(tiny_shapes):
    c = by_name(finetune_components(spec(tiny_shapes)))
    assert c["parameters"] == 4 * P and c["gradients"] == 4 * P and c["AdamW moments (m, v)"] == 8 * P
    assert c["gradient reduce bucket"] == 4 * P            # the whole model is under one 5e8-element bucket
    assert "fp32 master weights" not in c                   # fp32 training: the weights are the masters


def test_zero3_bf16_on_two_ranks_partitions_2_2_12_bytes(tiny_shapes):
    c = by_name(finetune_components(spec(tiny_shapes, dtype_bytes=2, world=2, zero_stage=3)))
    half = -(-P // 2)
    assert c["parameters"] == -(-2 * P // 2) and c["gradients"] == -(-2 * P // 2)
    assert c["fp32 master weights"] == -(-4 * P // 2) and c["AdamW moments (m, v)"] == -(-8 * P // 2)
    assert c["fp32 gradient of one optimizer sub-group"] == half * 4
    assert c["gathered parameters (ZeRO-3)"] == P * 2     # min(model, largest module + 5e7 prefetched)


def test_offload_moves_the_optimizer_to_the_host(tiny_shapes):
    s = spec(tiny_shapes, dtype_bytes=2, world=2, zero_stage=3, offload_optimizer=True)
    host, dev = by_name(finetune_components(s), "host"), by_name(finetune_components(s), "device")
    assert set(host) == {"gradients", "fp32 master weights", "fp32 gradient of one optimizer sub-group",
                         "AdamW moments (m, v)"}
    assert host["AdamW moments (m, v)"] == -(-8 * P // 2) and dev["parameters"] == -(-2 * P // 2)
    plan = build_plan(s)
    assert plan.total("train", "device") == sum(dev.values()) and plan.total("train", "host") == sum(host.values())
    cpu = build_plan(s.with_(device="cpu"))    # one memory: device + host
    assert cpu.total("train") == sum(dev.values()) + sum(host.values())


def test_keys_carry_phase_and_place():
    assert parse_key(key("x", "prepare", host=True)) == ("prepare", "host", "x")
    assert parse_key("bare") == ("train", "device", "bare")
    with pytest.raises(ValueError, match="phase"):
        key("x", "later")


def method_entries(name: str, tiny_shapes, *overrides: str, **kw) -> dict[str, int]:
    from cwac.experiment.plugins import get_method

    cfg = plan_cfg(f"method={name}", *overrides)
    return {parse_key(k)[2]: v for k, v in get_method(name).planned_memory(cfg.method, spec(tiny_shapes, **kw)).items()}


# per layer: C for q, k, v, o, down (d_out <= d_in), F for gate, up (d_out > d_in)
REF = 2 * (128 * 128 + 64 * 64 + 64 * 64 + 128 * 128 + 256 * 128 + 256 * 128 + 128 * 128)
LINEAR = 2 * (LAYER - 256)


def test_asft_holds_reference_and_anchor_in_the_model_dtype_sharded_under_zero3(tiny_shapes):
    e = method_entries("asft", tiny_shapes, dtype_bytes=2)
    assert e["reference C / F (model dtype)"] == REF * 2 and e["anchor W_aligned (model dtype)"] == LINEAR * 2
    e3 = method_entries("asft", tiny_shapes, dtype_bytes=2, world=2, zero_stage=3)
    assert e3["reference C / F (model dtype)"] == REF and e3["anchor W_aligned (model dtype)"] == LINEAR
    assert e["gradient hook: one map's fp32 Delta W, reference and (I - C)^2 Delta W"] < 10 * 256 * 128 * 4


def test_asft_offload_puts_its_tensors_on_the_host(tiny_shapes):
    from cwac.experiment.plugins import get_method

    cfg = plan_cfg("method=asft", "method.offload=true")
    raw = get_method("asft").planned_memory(cfg.method, spec(tiny_shapes))
    assert {parse_key(k)[1] for k, v in raw.items() if parse_key(k)[2].startswith(("anchor", "reference"))} == {"host"}


def test_lisa_anchor_is_one_model_dtype_copy_of_the_trainable_parameters(tiny_shapes):
    assert method_entries("lisa", tiny_shapes, dtype_bytes=2)["anchor w_tilde (model dtype)"] == 2 * P
    assert method_entries("lisa", tiny_shapes, dtype_bytes=2, world=2, zero_stage=3)["anchor w_tilde (model dtype)"] == P


def test_cwac_bases_w0_only_in_update_mode_and_sae(tiny_shapes):
    from cwac.experiment.plugins import get_method

    e = method_entries("cwac", tiny_shapes)
    bases = next(v for k, v in e.items() if k.startswith("bases U"))
    assert bases == 2 * 256 * 128 * 4                   # 2 layers x down_proj's d_in x (d_in / 2) columns
    assert not any(k.startswith("W0") for k in e)       # grad mode keeps no W0 on the device
    assert e["covariance of one input site"] == 256 * 256 * 8
    assert e["SAE 128 x 512 (model dtype)"] == (2 * 512 * 128 + 512 + 128) * 4
    assert e["drift / leak diagnostics: W0 copies (model dtype, CPU)"] == 2 * 128 * 256 * 4   # grad mode: host only
    up = method_entries("cwac", tiny_shapes, "method.weight.mode=update", dtype_bytes=2)
    assert up["W0 of the constrained maps (model dtype, update mode)"] == 2 * 128 * 256 * 2
    assert not any(k.startswith("drift / leak") for k in up)   # update mode's W0 serves the diagnostics too
    raw = get_method("cwac").planned_memory(plan_cfg("method=cwac", "method.weight.mode=update").method,
                                            spec(tiny_shapes, world=2, zero_stage=3))
    (w0,) = [k for k in raw if parse_key(k)[2].startswith("W0")]
    assert parse_key(w0)[1] == "host"                    # ZeRO-3: whole, on the host (cwac.constraints.partitioned)
    ranked = method_entries("cwac", tiny_shapes, "method.weight.selection=rank", "method.weight.rank=200")
    assert next(v for k, v in ranked.items() if k.startswith("bases U")) == 2 * 256 * 56 * 4   # the free complement
    act = method_entries("cwac_act_only", tiny_shapes)
    assert not any(k.startswith("bases U") for k in act) and any(k.startswith("regulariser forward") for k in act)


def test_sppft_frozen_band_saves_its_gradients_and_optimizer_state(tiny_shapes):
    e = method_entries("sppft", tiny_shapes, "method.band=[0,0]")
    assert list(e.values()) == [-LAYER * (4 + 8)]        # fp32 ZeRO-0: gradient 4 B + moments 8 B


def test_vaccine_and_safelora_and_sft(tiny_shapes):
    assert method_entries("vaccine", tiny_shapes, dtype_bytes=2) == {
        "alignment stage: pass-1 gradients G_l and perturbations eps_l": 2 * 2 * 16 * 128 * 2}
    e = method_entries("safelora", tiny_shapes)
    assert e["reference C / F (fp32, CPU)"] == REF * 4
    assert method_entries("sft", tiny_shapes) == {} and method_entries("safeinstr", tiny_shapes) == {}


def test_plan_cell_composes_the_cell_and_the_layout():
    from cwac.plan import plan_cell

    v = plan_cell(plan_cfg("method=lisa", "plan.zero_stage=3", "plan.gpus=2", "plan.device=cpu"))
    d = v.as_dict()
    assert d["spec"]["zero_stage"] == 3 and d["spec"]["world"] == 2 and d["fits"]
    names = [c["name"] for c in d["components"]]
    assert "anchor w_tilde (model dtype)" in names and "gathered parameters (ZeRO-3)" in names


@pytest.mark.parametrize("model,params", [("llama2_7b_chat", 6.738e9), ("llama3_8b_instruct", 8.030e9),
                                          ("mistral_7b_instruct", 7.242e9), ("gemma2_9b_it", 9.242e9)])
def test_paper_models_shapes_ship_offline(model, params):
    from cwac.plan import model_shapes

    s = model_shapes(compose(f"model={model}", "budget=paper", "+plan=default"))
    assert abs(s.n_params - params) / params < 1e-3
    assert s.tied == (model == "gemma2_9b_it")


def test_a_layout_that_does_not_fit_says_so_and_by_how_much(capsys):
    from cwac.plan.__main__ import main

    rc = main(["model=llama3_8b_instruct", "method=sft", "budget=paper", "plan.zero_stage=0", "plan.gpus=1"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "GiB over" in out
    rc = main(["model=llama3_8b_instruct", "method=sft", "budget=paper", "plan.zero_stage=3", "plan.gpus=8", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["fits"] and d["peak_gib"] < 77 and d["margin_gib"] == pytest.approx(d["budget_gib"] - d["peak_gib"], abs=1e-2)


def test_bad_layout_names_the_key():
    from cwac.plan import layout

    with pytest.raises(ValueError, match="plan.gpus=0"):
        layout(plan_cfg("plan.gpus=0"))
    assert GIB == 1024 ** 3


def test_matrix_plans_an_alignment_stage_that_refuses_zero3_at_zero2():
    """Booster's alignment stage refuses ZeRO-3 (pre-flight), so the paper matrix plans it at ZeRO-2 on the
    same GPUs; SFT and CWAC keep the ZeRO-3 layout."""
    from cwac.experiment import plugins  # noqa: F401  (registers the methods)
    from cwac.plan.__main__ import PAPER_LAYOUTS, refuses_zero3

    lay = ["model=llama2_7b_chat", "budget=paper", *PAPER_LAYOUTS["8x80GB ZeRO-3"]]
    assert refuses_zero3("booster", ["method=booster", *lay])
    assert not refuses_zero3("sft", ["method=sft", *lay]) and not refuses_zero3("cwac", ["method=cwac", *lay])
    assert not refuses_zero3("booster", ["method=booster", "model=llama2_7b_chat", "budget=paper",
                                         "training.zero_stage=2"])   # not ZeRO-3: nothing to refuse
