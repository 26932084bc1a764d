"""CWAC activation constraint: the latent values replicate the SAE exactly (and keep a gradient
where TopK drops a latent), latent selection, the SAE corpus mix, padding invariance, SAE
training with sae-lens, and reuse of every offline artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cwac.constraints.sae import SafetyLatents, mixed_batches, select_latents, selection_scores

from tests.cwac.conftest import SMALL


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 threads on 2 shared cores thrash


def _trained_like_sae(tmp_path, rescale: bool):
    """A sae-lens TopK training SAE with non-trivial b_dec, b_enc and decoder norms."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(64, 1) * 3 + 0.5)
    sae.save_inference_model(str(tmp_path / "sae"))
    return sae, SAE.load_from_disk(str(tmp_path / "sae"))


@pytest.mark.parametrize("rescale", [True, False])
def test_latents_replicate_sae_encoding(tmp_path, rescale):
    train_sae, inf_sae = _trained_like_sae(tmp_path, rescale)
    x = torch.randn(50, 16) * 2
    _, hidden_pre = train_sae.encode_with_hidden_pre(x)
    S = torch.tensor([3, 10, 17, 40, 63])
    # training class (decoder norms not folded): ReLU of the SAE's own hidden pre-activation
    assert torch.allclose(SafetyLatents(train_sae, S)(x), hidden_pre[:, S].relu(), atol=1e-5)
    # inference class (norms folded on save): equals the SAE's TopK code wherever TopK keeps the latent
    z, codes = SafetyLatents(inf_sae, S)(x), inf_sae.encode(x)[:, S]
    kept = codes > 0
    assert kept.any() and torch.allclose(z[kept], codes[kept], atol=1e-4)
    assert (z >= codes - 1e-5).all()
    # same values up to the folded scale (rescale folds ||W_dec|| into the encoder: identical)
    if rescale:
        assert torch.allclose(z, SafetyLatents(train_sae, S)(x), atol=1e-4)


def test_dropped_latent_still_has_gradient(tmp_path):
    _, sae = _trained_like_sae(tmp_path, True)
    x = torch.randn(200, 16, requires_grad=True)
    all_ids = torch.arange(64)
    z = SafetyLatents(sae, all_ids)(x)
    codes = sae.encode(x)
    dropped = (z > 0) & (codes == 0)                    # positive pre-activation, cut by TopK
    assert dropped.any()
    i, j = [int(t) for t in dropped.nonzero()[0]]
    (g_z,) = torch.autograd.grad(z[i, j], x)
    (g_c,) = torch.autograd.grad(sae.encode(x)[i, j], x)
    assert g_z[i].norm() > 0 and g_c.norm() == 0


def test_selection_criteria_find_harmful_latents():
    torch.manual_seed(0)
    harm = torch.rand(64, 20) * 0.1
    safe = torch.rand(80, 20) * 0.1
    harm[:, [3, 7]] += 1.0
    harm[::2, 11] = 0.0
    for crit in ("mean_diff", "t_stat", "freq_ratio"):
        if crit == "freq_ratio":
            h, s = (harm > 0.5).float() * harm, (safe > 0.5).float() * safe
        else:
            h, s = harm, safe
        top = select_latents(selection_scores(h, s, crit), 2)
        assert set(top.tolist()) == {3, 7}, crit
    assert len(select_latents(selection_scores(harm, safe, "mean_diff"), 100)) <= 20  # capped by d_sae
    with pytest.raises(ValueError, match="criterion"):
        selection_scores(harm, safe, "bogus")


def test_mixed_batches_keep_the_token_mix():
    harm, benign = torch.zeros(30, 4), torch.ones(500, 4)
    it = mixed_batches(harm, benign, 0.7, 100, seed=0)
    b = torch.cat([next(it) for _ in range(5)])
    assert len(b) == 500 and float((b[:, 0] == 0).float().mean()) == pytest.approx(0.7)


def test_pooled_latents_do_not_depend_on_padding(tiny_model):
    from cwac.constraints.activations import encode_prompts
    from cwac.constraints.sae import prompt_latents
    from cwac.data.harmful import held_in_harmful_prompts
    from cwac.data.prompts import pad_id

    model, tok, fmt, _ = tiny_model
    ids = encode_prompts(fmt, held_in_harmful_prompts()[:5], 64)
    fn = {"id": lambda h: h}
    for pooling in ("last", "mean"):
        alone = prompt_latents(model, 0, ids, fn, pooling, batch_size=1, pad=pad_id(tok))["id"]
        batched = prompt_latents(model, 0, ids, fn, pooling, batch_size=5, pad=pad_id(tok))["id"]
        assert torch.allclose(alone, batched, atol=1e-4), pooling


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
    return get_method(cfg.method.name)(cfg.method, ctx), model


def test_sae_training_and_artifact_reuse(tiny_cfg, tmp_path, monkeypatch):
    import cwac.constraints.sae as sae_mod
    import cwac.constraints.subspace as subspace_mod
    import cwac.constraints.method as method_mod

    m1, model = _method(tiny_cfg, tmp_path, "method=cwac", *SMALL)
    m1.prepare(model)
    info = m1.record_info()
    sae, lat = info["sae"], info["latents"]
    assert sae["architecture"] == "topk" and sae["d_sae"] == 4 * 128 and sae["layer"] == 0
    assert sae["tokens"]["harmful"] > 0 and sae["tokens"]["benign"] > 0
    q = sae["quality_heldout_harmful"]
    assert q["l0"] == pytest.approx(32) and q["fve"] > 0.2
    assert 10 <= lat["n_selected"] <= 40 and lat["score_selected_min"] > 0  # only positive-contrast latents
    # the recorded baselines are exactly the regulariser's values on the aligned model
    z = m1.act.drift(model, m1.ids["reg"][:8], m1.act.z_base[:8], batch_size=4)
    assert z["latent_drift"] < 1e-5
    metas = {k: json.loads((Path(info[k]["path"]) / "artifact.json").read_text())
             for k in ("subspace", "sae", "latents")}

    def boom(*a, **k):
        raise AssertionError("an offline artifact was rebuilt instead of reused")

    monkeypatch.setattr(method_mod, "train_topk_sae", boom)
    monkeypatch.setattr(method_mod, "build_subspaces", boom)
    monkeypatch.setattr(method_mod, "prompt_latents", boom)
    monkeypatch.setattr(subspace_mod, "input_covariances", boom)
    m2, model2 = _method(tiny_cfg, tmp_path, "method=cwac_weight_only", *SMALL)  # another cell of the sweep
    m2.prepare(model2)
    info2 = m2.record_info()
    for k in ("subspace", "sae", "latents"):
        assert info2[k]["reused"] is True and info2[k]["path"] == info[k]["path"]
        assert json.loads((Path(info2[k]["path"]) / "artifact.json").read_text()) == metas[k]
    assert torch.equal(m2.act.z_base, m1.act.z_base)
    # a changed selection config is a different artifact (rebuilt), the SAE is still shared
    monkeypatch.setattr(method_mod, "prompt_latents", sae_mod.prompt_latents)
    m3, model3 = _method(tiny_cfg, tmp_path, "method=cwac_act_only", *SMALL, "method.activation.n_latents=20")
    m3.prepare(model3)
    info3 = m3.record_info()
    assert info3["sae"]["reused"] is True and info3["latents"]["reused"] is False
    assert info3["latents"]["n_selected"] == min(20, lat["n_selected"])


def test_sae_loaded_from_disk(tiny_cfg, tmp_path):
    """``sae.source=disk``: a sae-lens folder (e.g. a pretrained SAE for a real model) replaces training."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    TopKTrainingSAE(TopKTrainingSAEConfig(d_in=128, d_sae=256, k=16)).save_inference_model(str(tmp_path / "disk_sae"))
    m, model = _method(tiny_cfg, tmp_path, "method=cwac_act_only", *SMALL, "method.diagnostics.drift=false",
                       "method.sae.source=disk", f"method.sae.path={tmp_path / 'disk_sae'}")
    m.prepare(model)
    info = m.record_info()
    assert info["sae"]["source"] == "disk" and info["sae"]["d_sae"] == 256 and len(info["sae"]["sha256"]) == 64
    assert info["latents"]["n_selected"] > 0 and m.act.layer == 0
    loss, _ = m.act.loss(model)
    assert torch.isfinite(loss)
    bad, model = _method(tiny_cfg, tmp_path, "method=cwac_act_only", *SMALL, "method.activation.layer=null",
                         "method.sae.source=disk", f"method.sae.path={tmp_path / 'disk_sae'}")
    with pytest.raises(ValueError, match="activation.layer"):
        bad.prepare(model)


def test_hook_names_map_to_the_block_whose_output_they_read():
    from cwac.constraints.sae import layer_from_hook_name

    assert layer_from_hook_name("model.layers.7") == 7
    assert layer_from_hook_name("blocks.7.hook_resid_post") == 7
    assert layer_from_hook_name("blocks.8.hook_resid_pre") == 7
    assert layer_from_hook_name("blocks.3.attn.hook_z") is None
    with pytest.raises(ValueError, match="embeddings"):   # not -1, which would read as the last block
        layer_from_hook_name("blocks.0.hook_resid_pre")
