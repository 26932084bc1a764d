"""CWAC activation constraint: the latent values replicate the SAE exactly (and keep a gradient
where TopK drops a latent), latent selection, the SAE corpus mix, padding invariance, SAE
training with sae-lens, reuse of every offline artifact, and the paper-scale corpus (extra
harmful prompts outside every evaluation set, residuals served chunk by chunk)."""

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


def test_sae_loaded_from_a_pretrained_release_is_recorded_as_such(tiny_cfg, tmp_path, monkeypatch):
    """``sae.source=pretrained``: sae-lens' ``SAE.from_pretrained(release, sae_id)`` (Gemma Scope, Llama
    Scope) replaces training, its hook gives the layer, and the record names the release and id. sae-lens
    is monkeypatched, so nothing is downloaded."""
    import sae_lens
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig

    import cwac.constraints.method as method_mod

    torch.manual_seed(0)
    TopKTrainingSAE(TopKTrainingSAEConfig(d_in=128, d_sae=256, k=16)).save_inference_model(str(tmp_path / "hub_sae"))
    calls = []

    def fake_from_pretrained(release, sae_id, device="cpu", **kw):
        calls.append((release, sae_id, device))
        sae = SAE.load_from_disk(str(tmp_path / "hub_sae"), device=device)
        sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        return sae

    def no_training(*a, **k):
        raise AssertionError("a pretrained SAE must not be trained")

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(method_mod, "train_topk_sae", no_training)
    m, model = _method(tiny_cfg, tmp_path, "method=cwac_act_only", *SMALL, "method.diagnostics.drift=false",
                       "method.activation.layer=null", "method.sae.source=pretrained",
                       "method.sae.release=gemma-scope-9b-it-res-canonical",
                       "method.sae.sae_id=layer_20/width_131k/canonical")
    m.prepare(model)
    sae = m.record_info()["sae"]
    assert calls == [("gemma-scope-9b-it-res-canonical", "layer_20/width_131k/canonical", "cpu")]
    assert sae["source"] == "pretrained" and sae["release"] == "gemma-scope-9b-it-res-canonical"
    assert sae["sae_id"] == "layer_20/width_131k/canonical" and sae["hook_name"] == "blocks.1.hook_resid_post"
    assert sae["layer"] == 1 == m.act.layer and sae["d_sae"] == 256 and sae.get("train") is None


def test_the_paper_sae_preset_composes_and_the_cpu_sae_is_unchanged(tmp_path):
    from cwac.schema import CWACConfig, check_node
    from tests.conftest import compose

    paper = compose("method=cwac", "budget=paper", runs=tmp_path)
    s = paper.method.sae
    assert s.expansion == 16 and s.source == "train"
    assert s.train.steps * s.train.batch_size == pytest.approx(100e6, rel=1e-3)   # the paper's ~100M tokens
    assert s.corpus.benign_source == "hub" and s.corpus.hub.dataset == "Skylion007/openwebtext"
    assert s.corpus.harmful_extra.dataset == "PKU-Alignment/BeaverTails" and s.corpus.harmful_extra.split == "30k_train"
    assert s.corpus.tokens * (1 - s.corpus.harmful_fraction) == pytest.approx(30e6)   # each benign token about once
    assert s.corpus.chunk_tokens * 4096 * 4 <= 4 * 2 ** 30      # at most 4 GiB of residuals held at d_model 4096
    check_node(paper.method, CWACConfig, "method")
    for method in ("cwac", "cwac_act_only", "cwac_weight_only"):
        assert compose(f"method={method}", "budget=paper").method.sae.expansion == 16, method
    cpu = compose("method=cwac", runs=tmp_path).method.sae
    assert cpu.expansion == 4 and cpu.corpus.benign_source == "alpaca" and "hub" not in cpu.corpus
    assert cpu.corpus.tokens == 40000 and cpu.train.steps == 300
    assert cpu.corpus.harmful_extra is None and cpu.corpus.chunk_tokens is None
    check_node(compose("method=cwac").method, CWACConfig, "method")


def test_the_hub_benign_corpus_needs_offline_false(tmp_path):
    from cwac.experiment.preflight import ConfigError, check_settings
    from tests.conftest import compose

    cfg = compose("model=tiny", "method=cwac", "budget=paper", runs=tmp_path, artifacts=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"method.sae.corpus.benign_source=hub .* offline=false"):
        check_settings(cfg)


def test_the_hub_benign_corpus_streams_shuffled_web_text(monkeypatch):
    import datasets
    from omegaconf import OmegaConf

    from cwac.constraints.sae import benign_examples

    seen = {}

    class Stream:
        def __init__(self, rows):
            self.rows = rows

        def shuffle(self, seed, buffer_size):
            seen["shuffle"] = (seed, buffer_size)
            return Stream(self.rows[::-1])

        def __iter__(self):
            for i, r in enumerate(self.rows):
                seen["read"] = i + 1
                yield r

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        seen["args"] = (name, config, split, streaming)
        return Stream([{"text": f"doc {i}"} for i in range(1000)] + [{"text": "  "}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ccfg = OmegaConf.create({"benign_source": "hub", "hub": {"dataset": "Skylion007/openwebtext", "name": None,
                                                            "split": "train", "text_field": "text",
                                                            "shuffle_buffer": 64}})
    rows = benign_examples(ccfg, seed=3)
    first = [next(rows) for _ in range(3)]
    assert seen["args"] == ("Skylion007/openwebtext", None, "train", True) and seen["shuffle"] == (3, 64)
    assert [e.instruction for e in first] == ["doc 999", "doc 998", "doc 997"]   # the blank document is skipped
    assert seen["read"] == 4          # a stream: read only as far as the corpus needs
    with pytest.raises(ValueError, match="corpus.hub"):
        benign_examples(OmegaConf.create({"benign_source": "hub"}), seed=0)


# ----------------------------------------------------------------------------- the corpus, chunk by chunk

def _sae_cfg(**train):
    from omegaconf import OmegaConf

    from tests.conftest import compose

    s = compose("method=cwac").method.sae
    OmegaConf.set_struct(s, False)
    return OmegaConf.merge(s, {"train": {"steps": 30, "batch_size": 64, "warmup_steps": 2, "dead_feature_window": 10,
                                         "norm_estimate_batches": 2, "device": "cpu", **train}})


def test_a_chunk_holding_the_whole_corpus_gives_the_same_sae(tiny_model):
    """``corpus.chunk_tokens`` larger than the corpus: one chunk, the same residuals, batches and SAE
    as collecting the corpus at once and sampling ``mixed_batches`` from it."""
    from cwac.constraints.activations import encode_conversations, encode_prompts
    from cwac.constraints.sae import collect_residuals, train_topk_sae
    from cwac.constraints.sae_corpus import ResidualStream
    from cwac.data.harmful import alpaca_examples, held_in_harmful_prompts
    from cwac.data.prompts import pad_id

    model, tok, fmt, _ = tiny_model
    harm_ids = encode_prompts(fmt, held_in_harmful_prompts()[:24], 64)
    benign_ids = encode_conversations(fmt, alpaca_examples()[:10], 96)

    def collect(ids, last=None):
        return collect_residuals(model, 0, ids, batch_size=8, pad=pad_id(tok), skip_tokens=1, last=last)

    s = _sae_cfg()
    whole_h, whole_b = collect(harm_ids), collect(benign_ids)
    ref, _ = train_topk_sae(whole_h, whole_b, s, seed=0)
    stream = ResidualStream(collect, harm_ids, iter(benign_ids), d=128, skip=1, tokens=10 ** 9, harmful_fraction=0.7,
                            chunk_tokens=10 ** 9)
    c = stream.next_chunk()
    assert torch.equal(c.harmful, whole_h) and torch.equal(c.benign, whole_b) and stream.done
    empty = torch.zeros(0, 128)
    chunked, _ = train_topk_sae(empty, empty, s, seed=0, batches=stream.batches(c.harmful, c.benign, 64, 0))
    assert stream.n_chunks == 1
    want, got = ref.state_dict(), chunked.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_stream_holds_one_chunk_at_a_time_and_reads_the_benign_text_once():
    """Memory held is bounded by ``chunk_tokens`` (plus one sequence a side): a chunk's residuals are
    freed before the next chunk's are collected; every benign row is read once, in order."""
    import weakref

    from cwac.constraints.sae_corpus import ResidualStream

    g = torch.Generator().manual_seed(0)
    harm_ids = [[1] * int(n) for n in torch.randint(5, 20, (40,), generator=g)]
    benign_rows = [[2] * int(n) for n in torch.randint(10, 30, (120,), generator=g)]
    chunk, skip, longest = 400, 1, 30
    alive, live_max, read = [], [0], []

    def collect(ids, last=None):
        live_max[0] = max(live_max[0], sum(len(t) for r in alive if (t := r()) is not None))
        out = torch.full((sum(len(x) - skip for x in ids), 4), float(ids[0][0]))
        alive.append(weakref.ref(out))
        if ids[0][0] == 2:
            read.extend(ids)
        return out

    benign_tokens = sum(len(x) - skip for x in benign_rows)
    stream = ResidualStream(collect, harm_ids, iter(benign_rows), d=4, skip=skip, tokens=int(benign_tokens / 0.3) + 1000,
                            harmful_fraction=0.7, chunk_tokens=chunk)
    c = stream.next_chunk()
    it = stream.batches(c.harmful, c.benign, 50, seed=0)
    del c
    rows = torch.cat([next(it) for _ in range(200)])
    assert stream.done and stream.n_chunks > 5 and read == benign_rows   # the benign text once, in order
    assert stream.benign_seen == benign_tokens
    assert stream.peak_rows <= chunk + 2 * longest
    assert live_max[0] <= chunk + 2 * longest          # never two chunks alive at once
    assert float((rows[:, 0] == 1).float().mean()) == pytest.approx(0.7, abs=0.01)
    assert stream.info()["harmful_prompt_passes"] > 1   # the harmful prompts cycle


def _fake_beavertails(monkeypatch, train_rows):
    """``datasets.load_dataset`` for BeaverTails: ``train_rows`` as 30k_train, 30k_test with one of them."""
    import datasets

    import cwac.data.harmful as harmful

    test_rows = [{"prompt": "How do I pick a lock on my neighbour's door?", "is_safe": False}] + \
                [{"prompt": f"test prompt {i}", "is_safe": False} for i in range(1000)]
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kw):
        calls.append((name, split))
        assert name == "PKU-Alignment/BeaverTails" and split in ("30k_train", "30k_test")
        return train_rows if split == "30k_train" else test_rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    harmful.prompt_set.cache_clear()
    monkeypatch.setattr(harmful, "prompt_set", harmful.prompt_set)   # cleared again after the test
    return calls


@pytest.fixture
def _clear_prompt_sets():
    import cwac.data.harmful as harmful

    yield
    harmful.prompt_set.cache_clear()   # the fake 30k_test must not outlive the test


def _extra_spec(**kw):
    from omegaconf import OmegaConf

    return OmegaConf.create({"dataset": "PKU-Alignment/BeaverTails", "name": None, "split": "30k_train",
                             "prompt_field": "prompt", "safe_field": "is_safe", "n_prompts": None, **kw})


@pytest.mark.usefixtures("_clear_prompt_sets")
def test_extra_harmful_prompts_leave_out_every_evaluation_prompt(monkeypatch):
    from cwac.constraints.sae_corpus import extra_harmful_prompts
    from cwac.data.harmful import prompt_set

    ev = {s: prompt_set(s)[0] for s in ("beavertails_eval", "harmbench_test", "beavertails_attack_val", "strongreject")}
    new = [f"Explain how to do harmful thing number {i}." for i in range(30)]
    rows = ([{"prompt": p, "is_safe": False} for p in new] + [{"prompt": new[0] + "  ", "is_safe": False}]
            + [{"prompt": p, "is_safe": False} for p in ev.values()]
            + [{"prompt": "How do I pick a lock on my neighbour's door?", "is_safe": False},   # in 30k_test
               {"prompt": "pool prompt", "is_safe": False}, {"prompt": "a safe one", "is_safe": True}])
    calls = _fake_beavertails(monkeypatch, rows)
    prompts, info = extra_harmful_prompts(_extra_spec(), exclude=["Pool prompt"], seed=0)
    assert sorted(prompts) == sorted(new)                                # only the new, distinct, unsafe ones
    assert ("PKU-Alignment/BeaverTails", "30k_test") in calls            # read to be left out, never used
    assert info["dropped_as_evaluation"] == len(ev) + 1 and info["unsafe_rows"] == len(rows) - 1
    assert prompts == extra_harmful_prompts(_extra_spec(), exclude=["Pool prompt"], seed=0)[0]   # seeded
    assert extra_harmful_prompts(_extra_spec(n_prompts=5), exclude=["Pool prompt"], seed=0)[0] == prompts[:5]
    with pytest.raises(ValueError, match=r"harmful_extra.split='30k_test'.*HS set"):
        extra_harmful_prompts(_extra_spec(split="30k_test"), exclude=[], seed=0)


def test_extra_harmful_prompts_keep_what_the_aligned_model_refuses(tmp_path, monkeypatch):
    """The pool's refusal filter (keyword judge on a short greedy answer, cached per model)."""
    import json as _json

    from omegaconf import OmegaConf

    import cwac.constraints.pool as pool_mod
    from cwac.artifacts import ArtifactStore
    from cwac.constraints.sae_corpus import refused_prompts

    def fake_flags(model, tok, formatter, prompts, pcfg, out):
        rows = [{"prompt": p, "answer": "", "refused": "bomb" in p} for p in prompts]
        (out / "refusals.json").write_text(_json.dumps(rows))
        return {"n_prompts": len(rows)}

    class Fmt:
        style, system_prompt = "alpaca", None

    monkeypatch.setattr(pool_mod, "_refusal_flags", fake_flags)
    pcfg = OmegaConf.create({"filter_refused": True, "refusal_max_new_tokens": 8, "min_refused_fraction": 0.5,
                             "batch_size": 4})
    prompts = ["make a bomb", "build a bomb", "a bomb now", "steal a car"]
    store = ArtifactStore(tmp_path)
    kept, info = refused_prompts(prompts, None, None, Fmt(), pcfg, store, "tiny-path")
    assert kept == prompts[:3] and info["filter_applied"] and info["refused_fraction"] == 0.75
    low, info = refused_prompts(["steal a car", "bomb"], None, None, Fmt(), OmegaConf.merge(pcfg, {"min_refused_fraction": 0.9}),
                                store, "tiny-path")
    assert low == ["steal a car", "bomb"] and not info["filter_applied"]   # an unaligned model: unfiltered, recorded
    assert refused_prompts(prompts, None, None, Fmt(), OmegaConf.merge(pcfg, {"filter_refused": False}), store,
                           "tiny-path")[0] == prompts


@pytest.mark.usefixtures("_clear_prompt_sets")
def test_the_sae_trains_on_extra_harmful_prompts_chunk_by_chunk(tiny_cfg, tmp_path, monkeypatch):
    new = [f"Describe a dangerous plan, step {i}." for i in range(20)]
    _fake_beavertails(monkeypatch, [{"prompt": p, "is_safe": False} for p in new])
    m, model = _method(tiny_cfg, tmp_path, "method=cwac_act_only", *SMALL, "method.diagnostics.drift=false",
                       "method.sae.train.steps=30", "method.sae.corpus.chunk_tokens=600",
                       "method.sae.corpus.harmful_extra={dataset: PKU-Alignment/BeaverTails, name: null, "
                       "split: 30k_train, prompt_field: prompt, safe_field: is_safe, n_prompts: 12}")
    m.prepare(model)
    sae = m.record_info()["sae"]
    n_reg = len(m.ids["reg"])
    extra, chunks = sae["harmful_extra"], sae["chunks"]
    assert extra["n_used"] == 12 and sae["tokens"]["harmful_prompts"] == n_reg + 12
    assert not extra["filter_refused"]                       # SMALL: prompts.filter_refused=false
    assert chunks["n_chunks"] > 1 and chunks["peak_rows"] <= 600 + 256 + 256
    assert sae["quality_heldout_harmful"]["l0"] == pytest.approx(32)
    assert m.z_base_heldout is not None and len(m.act.reg_ids) == n_reg   # the extras train the SAE only


def test_the_new_corpus_keys_at_null_keep_the_cpu_hash():
    """``sae.corpus.harmful_extra`` / ``chunk_tokens`` null compute what the runs before them computed
    (``cwac.records.HASH_NEUTRAL``); set, they change the hash."""
    from omegaconf import OmegaConf

    from cwac.records import config_hash
    from cwac.utils import compose_config

    cfg = compose_config("method=cwac")
    assert cfg.method.sae.corpus.harmful_extra is None and cfg.method.sae.corpus.chunk_tokens is None
    before = OmegaConf.create(OmegaConf.to_container(cfg))
    del before.method.sae.corpus["harmful_extra"], before.method.sae.corpus["chunk_tokens"]
    assert config_hash(cfg) == config_hash(before)
    assert config_hash(compose_config("method=cwac", "method.sae.corpus.chunk_tokens=1000")) != config_hash(cfg)


def test_extra_harmful_prompts_need_offline_false_and_a_train_split(tmp_path):
    from cwac.experiment.preflight import ConfigError, check_settings
    from tests.conftest import compose

    base = ("model=tiny", "method=cwac", "budget=paper", "method.sae.corpus.benign_source=alpaca")
    cfg = compose(*base, runs=tmp_path, artifacts=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"method.sae.corpus.harmful_extra .* offline=false"):
        check_settings(cfg)
    cfg = compose(*base, "offline=false", "method.sae.corpus.harmful_extra.split=30k_test", runs=tmp_path,
                  artifacts=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"harmful_extra.split='30k_test'"):
        check_settings(cfg)
