"""Antidote: after fine-tuning, exactly the top-scored weights of every row are zero, where the score is
Wanda's |W_ij| * ||X_j|| on the harmful re-alignment pairs, and nothing else changes (full FT: W of
q, k, v; LoRA: the adapter's A and B)."""

from __future__ import annotations

import pytest
import torch

from cwac.modeling import base_weight, linear_modules, lora_factors
from tests.baselines.conftest import make_ctx, make_method, params


def _antidote(tiny_model, tmp_path, *overrides, **cfg):
    from tests.conftest import compose

    _, tok, fmt, _ = tiny_model
    ccfg = compose("model=tiny", "budget=smoke", "method=antidote", *overrides)
    return make_method("antidote", make_ctx(ccfg, tok, fmt, tmp_path), **cfg)


def _column_sq_norms(model, layers: dict, feats: list[dict]) -> dict[str, torch.Tensor]:
    """Independent of the module: sum over every token of x_j^2 at each layer's input, one row at a
    time (no padding)."""
    xs: dict[str, list] = {n: [] for n in layers}
    hs = [lin.register_forward_pre_hook(lambda mod, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for n, lin in layers.items()]
    try:
        with torch.no_grad():
            for f in feats:
                model(input_ids=torch.tensor([f["input_ids"]]))
    finally:
        for h in hs:
            h.remove()
    return {n: (torch.cat(v) ** 2).sum(0) for n, v in xs.items()}


def _top_per_row(W: torch.Tensor, sq: torch.Tensor, k: int) -> torch.Tensor:
    score = W.abs() * sq.sqrt()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return mask


def _check_exact_pruning(model, m, layers: dict, sq: dict, k: int, before: dict):
    """The top-k of every row by score are zero, every other entry of every parameter is unchanged."""
    expected = {n: _top_per_row(lin.weight.detach().clone(), sq[n], k) for n, lin in layers.items()}
    ids = {id(lin.weight): n for n, lin in layers.items()}
    m.post_train(model)
    for pname, p in model.named_parameters():
        if id(p) in ids:
            e = expected[ids[id(p)]]
            assert torch.equal(m.masks[ids[id(p)]], e), pname
            assert bool((p[e] == 0).all()), pname
            assert torch.equal(p[~e], before[pname][~e]), pname
            assert int(e.sum()) == k * p.shape[0]
        else:
            assert torch.equal(p, before[pname]), pname                  # nothing else changed
    # the activation statistic matters: |W| alone would pick other weights
    some = next(iter(layers))
    W0 = before[next(n for n, p in model.named_parameters() if id(p) == id(layers[some].weight))]
    assert not torch.equal(_top_per_row(W0, torch.ones_like(sq[some]), k), expected[some])


def test_full_ft_zeroes_exactly_the_top_scored_weights_of_q_k_v(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _antidote(tiny_model, tmp_path, n_harmful=6, batch_size=4, dense_ratio={"full": 0.1})
    m.prepare(model)
    layers = m.prunable(model)
    qkv = ("q_proj", "k_proj", "v_proj")
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in qkv)
    sq = _column_sq_norms(model, layers, m.features)   # batch 1 here, padded batches of 4 in the method
    d_in = 128
    k = d_in - int(d_in * 0.9)
    assert k == 13
    _check_exact_pruning(model, m, layers, sq, k, params(model))
    assert m.info["n_pruned"] == 13 * sum(lin.weight.shape[0] for lin in layers.values())
    assert m.info["n_harmful"] == 6 and m.info["pruned"] == "W"


def test_lora_prunes_the_adapter_factors_of_adapted_maps_only(tiny_model, tmp_path):
    from cwac.experiment.cell import apply_lora
    from tests.conftest import compose

    model, *_ = tiny_model
    lora = apply_lora(model, compose("model=tiny", "training=lora").training.lora)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():                                 # a trained adapter: B no longer zero
        for mod in linear_modules(lora, ["q_proj", "v_proj"]).values():
            B = lora_factors(mod)[0]
            B.copy_(torch.randn(B.shape, generator=g))
    m = _antidote(tiny_model, tmp_path, "training=lora", n_harmful=4, dense_ratio={"lora": 0.25})
    m.prepare(lora)
    layers = m.prunable(lora)
    # q, v of 2 layers (k has no adapter), A and B each
    assert len(layers) == 8 and all(n.endswith((".lora_A", ".lora_B")) for n in layers)
    sq = _column_sq_norms(lora, layers, m.features)
    r = lora_factors(linear_modules(lora, ["q_proj"])["model.layers.0.self_attn.q_proj"])[0].shape[1]
    layers_a = {n: l for n, l in layers.items() if n.endswith("lora_A")}
    layers_b = {n: l for n, l in layers.items() if n.endswith("lora_B")}
    before = params(lora)
    k_a, k_b = 128 - int(128 * 0.75), r - int(r * 0.75)
    assert (k_a, k_b) == (32, 2)
    expected = {n: _top_per_row(l.weight.detach().clone(), sq[n], k_a) for n, l in layers_a.items()}
    expected |= {n: _top_per_row(l.weight.detach().clone(), sq[n], k_b) for n, l in layers_b.items()}
    frozen_k = base_weight(linear_modules(lora, ["k_proj"])["model.layers.0.self_attn.k_proj"]).detach().clone()
    m.post_train(lora)
    ids = {id(l.weight): n for n, l in layers.items()}
    for pname, p in lora.named_parameters():
        if id(p) in ids:
            e = expected[ids[id(p)]]
            assert torch.equal(m.masks[ids[id(p)]], e) and bool((p[e] == 0).all()), pname
            assert torch.equal(p[~e], before[pname][~e]), pname
        else:
            assert torch.equal(p, before[pname]), pname
    assert torch.equal(base_weight(linear_modules(lora, ["k_proj"])["model.layers.0.self_attn.k_proj"]), frozen_k)
    assert m.info["pruned"] == "lora_A, lora_B"


def test_reference_full_ft_ratio_prunes_one_weight_per_row(tiny_model, tmp_path):
    model, *_ = tiny_model
    m = _antidote(tiny_model, tmp_path, n_harmful=2)
    assert m.dense_ratio == 1e-5
    m.prepare(model)
    m.post_train(model)
    for n, mask in m.masks.items():
        assert torch.equal(mask.sum(1), torch.ones(mask.shape[0], dtype=torch.long)), n


def test_realignment_data_is_the_defence_range_and_overlap_is_counted(tiny_model, tmp_path):
    from cwac.data.harmful import EVAL_HARMFUL_SETS, VALIDATION_HARMFUL_SETS, assert_disjoint, beavertails_pairs

    model, *_ = tiny_model
    m = _antidote(tiny_model, tmp_path)
    m.prepare(model)
    local = beavertails_pairs("local")
    assert len(m.rows) == 99 and all(e in local[100:200] for e in m.rows)
    assert_disjoint([e.instruction for e in m.rows], EVAL_HARMFUL_SETS + VALIDATION_HARMFUL_SETS)
    assert m.build_train_data(local[:100]) == local[:100] and m.overlap == 0
    m.build_train_data(local[:150])
    assert m.overlap == sum(e in m.rows for e in local[100:150]) > 0
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    with pytest.raises(ValueError, match=r"method.dense_ratio.full=0.0 is not valid: it must be in \(0, 1\)"):
        check_settings(compose("model=tiny", "budget=smoke", "method=antidote", "method.dense_ratio.full=0.0"))


def test_preflight_names_a_bad_source_before_any_model_loads():
    from cwac.experiment.preflight import check_settings
    from tests.conftest import compose

    check_settings(compose("model=tiny", "budget=smoke", "method=antidote"))
    with pytest.raises(ValueError, match=r"method.harmful_source: Invalid value 'web', expected one of \[local, hub\]"):
        check_settings(compose("model=tiny", "budget=smoke", "method=antidote", "method.harmful_source=web"))


def test_preflight_checks_the_re_alignment_pairs_before_any_model_loads(tiny_cfg, monkeypatch):
    import datasets

    from cwac.experiment.preflight import ConfigError, check_inputs

    assert check_inputs(tiny_cfg("method=antidote", "method.n_harmful=99")).rows
    with pytest.raises(ConfigError, match=r"config method: method.n_harmful=100 but harmful_source='local' has 99"):
        check_inputs(tiny_cfg("method=antidote", "method.n_harmful=100"))

    def not_cached(*a, **kw):
        raise ConnectionError("Couldn't reach 'PKU-Alignment/BeaverTails' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)   # offline, and the split is not in the cache
    with pytest.raises(ConfigError, match=r"method.harmful_source=hub: BeaverTails could not be read .* offline=false"):
        check_inputs(tiny_cfg("method=antidote", "method.harmful_source=hub"))


def test_cell_runs_and_records_antidote(tiny_cfg):
    from cwac.experiment.cell import run_cell

    rec = run_cell(tiny_cfg("model.align=true", "harmful=p0.1", "eval.hs_n=4", "eval.harmless_n=0", "eval.fa_n=4",
                            "method=antidote", "method.n_harmful=8"))
    assert rec["status"] == "complete" and 0 <= rec["metrics"]["hs"] <= 100
    info = rec["info"]["method"]
    assert info["pruned"] == "W" and info["n_matrices"] == 6 and info["n_harmful"] == 8
    assert info["n_pruned"] == 2 * (128 + 64 + 64) and info["overlap_with_mix"] == 0   # one per row of q, k, v
