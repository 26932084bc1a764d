"""CWAC as a method: the activation term's gradient path (layers ≤ l* only, early exit), latent
drift vs SFT at equal steps, the variants' flags, and a full pipeline cell with its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cwac.conftest import SMALL


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 threads on 2 shared cores thrash


def _method(tiny_cfg, tmp_path, *overrides):
    from cwac.artifacts import ArtifactStore
    from cwac.data.prompts import PromptFormatter
    from cwac.api import TrainContext
    from cwac.experiment.plugins import get_method
    from cwac.models import load_model, resolve_model_path

    cfg = tiny_cfg(*overrides)
    store = ArtifactStore(cfg.paths.artifacts)
    path = resolve_model_path(cfg.model, store)
    model, tok = load_model(path)
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=PromptFormatter(tok, "chat"), store=store, run_dir=tmp_path,
                       stage="finetune", start_model_path=path)
    return cfg, get_method(cfg.method.name)(cfg.method, ctx), model, tok


def test_activation_gradient_reaches_layers_up_to_lstar_only(tiny_cfg, tmp_path):
    from cwac.modeling import decoder_layers

    _, m, model, _ = _method(tiny_cfg, tmp_path, "method=cwac_act_only", "method.diagnostics.drift=false", *SMALL)
    m.prepare(model)
    assert m.act.layer == 0
    blocks = decoder_layers(model)
    with torch.no_grad():  # move layer 0 a little so that z differs from z_base
        for p in blocks[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    h = blocks[1].register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad()
    loss, metrics = m.act.loss(model)
    h.remove()
    assert not calls, "the regulariser forward ran past layer l* (no early exit)"
    assert loss > 0 and metrics["latent_drift"] > 0
    loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    for name, p in blocks[0].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in [*blocks[1].named_parameters(), ("lm_head", model.lm_head.weight)]:
        assert p.grad is None or p.grad.abs().sum() == 0, name
    assert all(not p.requires_grad for p in m.act.latents.sae.parameters())  # SAE frozen


def test_latent_drift_smaller_than_sft_at_equal_steps(tiny_cfg, tmp_path):
    from cwac.data.mix import build_finetune_mix
    from cwac.api import Method
    from cwac.models import load_model
    from cwac.trainer import train

    # 8 steps at lr 3e-4; the term is made scale-free (base_energy) because the untrained tiny
    # model's latents are small (at lr 1e-3 Adam's sign-like early steps overshoot them)
    over = ["method=cwac_act_only", "method.diagnostics.drift=false", *SMALL, "training.max_steps=8",
            "harmful.n_total=32", "training.lr=3e-4", "method.activation.scale=base_energy",
            "method.activation.lam=10.0"]
    cfg, m, model, tok = _method(tiny_cfg, tmp_path, *over)
    m.prepare(model)
    fmt = m.ctx.formatter
    rows = build_finetune_mix(cfg.task.name, cfg.harmful.n_total, cfg.harmful.ratio, cfg.seed)
    feats = [fmt.train_features(e, cfg.training.max_len) for e in rows]
    sft_model, _ = load_model(m.ctx.start_model_path)
    train(sft_model, feats, Method(cfg.method, m.ctx), cfg.training, tok, cfg.seed, desc="sft")
    res = train(model, feats, m, cfg.training, tok, cfg.seed, desc="cwac")
    reg = m.ids["reg"]
    d_cwac = m.act.drift(model, reg, m.act.z_base, 8)["latent_drift"]
    d_sft = m.act.drift(sft_model, reg, m.act.z_base, 8)["latent_drift"]
    assert d_cwac < 0.5 * d_sft, (d_cwac, d_sft)
    assert res.steps == 8 and all("losses/cwac_safety" in h for h in res.history)


def test_variant_flags_are_checked_before_any_model_loads(tiny_cfg, tmp_path):
    from cwac.constraints.subspace import Subspace, WeightConstraint
    from cwac.experiment.preflight import check_settings
    from cwac.schema import ConfigError

    with pytest.raises(ConfigError, match=r"method=cwac_weight_only needs method.weight.enabled=True and "
                                          r"method.activation.enabled=False, got True and True"):
        check_settings(tiny_cfg("method=cwac_weight_only", "method.activation.enabled=true"))
    with pytest.raises(ConfigError, match=r"activation.enabled=false is plain SFT; use method=sft"):
        check_settings(tiny_cfg("method=cwac", "method.activation.enabled=false", "method.weight.enabled=false"))
    with pytest.raises(ConfigError, match=r"method.weight.mode='update'.*zero_stage=1"):
        check_settings(tiny_cfg("method=cwac", "method.weight.mode=update", "training.precision=bf16",
                                "training.weight_decay=0.1"))
    with pytest.raises(ConfigError, match=r"method.weight.project_at='inputs' is not valid; valid values: gradient, "
                                          r"input, auto"):
        check_settings(tiny_cfg("method=cwac", "method.weight.project_at=inputs"))
    check_settings(tiny_cfg("method=cwac_act_only", "method.weight.mode=update", "training.precision=bf16",
                            "training.weight_decay=0.1"))   # no weight constraint: its mode is not used
    _, m, _, _ = _method(tiny_cfg, tmp_path, "method=cwac_act_only")
    assert m.variant == "act_only" and not m.use_weight
    with pytest.raises(ValueError, match="ZeRO-3"):
        WeightConstraint({"x": Subspace(torch.eye(4)[:, :1], "protected", 1)}, "update", zero_stage=3)


def test_update_mode_refuses_zero0_mixed_precision_with_weight_decay(tiny_cfg, tmp_path):
    """DeepSpeed's ZeRO-0 bf16 optimizer keeps fp32 masters the projection cannot reach: with
    weight decay, update mode would leak, so prepare() refuses before building any artifact."""
    cfg, m, model, _ = _method(tiny_cfg, tmp_path, "method=cwac", "method.weight.mode=update",
                               "training.precision=bf16", "training.weight_decay=0.1")
    before = sorted(Path(cfg.paths.artifacts).rglob("*"))
    with pytest.raises(ValueError, match="zero_stage=1"):
        m.prepare(model)
    assert sorted(Path(cfg.paths.artifacts).rglob("*")) == before
    from cwac.constraints.subspace import check_mode

    for way_out in [(0, "bf16", 0.0), (1, "bf16", 0.1), (0, "fp32", 0.1)]:   # the fixes the error names
        check_mode("update", *way_out)


def test_pipeline_cell_writes_cwac_record(tiny_cfg):
    from cwac.experiment.cell import run_cell

    cfg = tiny_cfg("method=cwac", *SMALL, "method.prompts.filter_refused=true", "method.diagnostics.leak_every=1",
                   "method.diagnostics.grad_norm_every=2", "method.weight.mode=update")
    rec = run_cell(cfg)
    assert rec["status"] == "complete"
    info = rec["info"]["method"]
    assert info["variant"] == "cwac" and info["config"]["activation"]["lam"] == 0.5
    assert info["prompts"]["filter_refused"] and info["prompts"]["filter_applied"] is False  # tiny model refuses nothing
    assert info["subspace"]["n_maps"] == 2 and info["subspace"]["energy_kept_min"] >= 0.99
    assert info["diagnostics"]["proj_leak_final"] < 1e-5                # update mode
    assert set(info["diagnostics"]) >= {"map_drift_heldout", "map_drift_calibration", "latent_drift_heldout"}
    tm = info["train_metrics"]
    assert tm["proj_leak"]["n"] == 3 and tm["proj_leak"]["last"] < 1e-5
    assert {"grad_norm_task", "grad_norm_safety", "latent_drift", "cwac_safety_raw"} <= set(tm)
    log = [json.loads(x) for x in open(f"{rec['run_dir']}/train_log.jsonl")]
    assert all("finetune/losses/cwac_safety" in r and "finetune/metrics/latent_drift" in r for r in log)
