"""CWAC: Coupled Weight and Activation Constraints for fine-tuning (Peng, Zhang, Zeng, Jiang, Gao;
*Preventing Safety Drift in Large Language Models via Coupled Weight and Activation
Constraints*, Findings of ACL 2026, arXiv 2604.12384). Spec: ``docs/method.md``.

One layer's output drift splits into a weight term and an activation term,
``Δy ≈ f'(W₀h₀) ⊙ (ΔW h₀ + W₀ Δh)`` (docs/method.md §2); CWAC bounds both:

* **weight constraint** (``cwac.constraints.subspace``): updates of the constrained linear maps
  (``down_proj`` in the paper) are kept out of the top-energy input directions ``U_r`` of the
  aligned model on harmful prompts, so ``ΔW h₀ ≈ 0`` there;
* **activation constraint** (``cwac.constraints.sae``): ``λ · mean_b Σ_{j∈S} (z_j − z_base_j)²``
  on the pre-TopK activations of SAE safety latents at one mid-depth residual stream, on a
  batch of harmful prompts each step, so ``Δh`` stays small on them.

Registered variants (the paper's component ablation, §7.4): ``cwac`` (both), ``cwac_weight_only``,
``cwac_act_only``; one class, flags from ``method.weight.enabled`` / ``method.activation.enabled``.
Offline pieces (prompt refusal filter, subspace, SAE, selected latents + baselines) are
artifacts keyed by model, prompts and config, built once per sweep. Every [inferred] choice
is a field of ``conf/method/cwac.yaml`` and is returned by ``record_info``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cwac.artifacts import ArtifactStore
from cwac.constraints.activations import encode_conversations, encode_prompts, resolve_layer, shared_prefix_len
from cwac.constraints.basis import store_bases
from cwac.constraints.drift import DriftProbe
from cwac.constraints.partitioned import OnDevice, PartitionedWeightConstraint
from cwac.constraints.pool import build_pool, formatter_identity, model_identity
from cwac.constraints.sae import (ActivationConstraint, SafetyLatents, all_latents, benign_examples,
                                  collect_residuals, layer_from_hook_name, load_sae, prompt_latents, sae_quality,
                                  select_latents, selection_scores, split_eval, train_topk_sae)
from cwac.constraints.sae_corpus import ResidualStream, extra_harmful_prompts, refused_prompts
from cwac.constraints.subspace import build_subspaces, check_mode, find_targets, load_subspaces, parse_targets, resolve_layers
from cwac.modeling import is_lora
from cwac.data.prompts import pad_id
from cwac.modeling import decoder_layers, hf_model
from cwac.schema import CWACConfig
from cwac.api import LossOutput, Method, TrainContext
from cwac.utils import file_sha256, stable_hash

log = logging.getLogger(__name__)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


class CWAC(Method):
    """Full CWAC (both constraints unless the config disables one).

    Config: ``conf/method/cwac.yaml`` (every field documented there).
    """

    stages = ("finetune",)
    schema = CWACConfig
    #: (weight, activation) flags a registered variant requires; None = any
    required: tuple[bool, bool] | None = None

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """The constraint flags the variant needs, the projection mode against the training setup
        (``check_mode``: update mode at ZeRO-0 in mixed precision with weight decay cannot reach the
        fp32 masters) and the SAE corpus's hub reads (a stream is never cached, so not offline; no
        test split for ``harmful_extra``)."""
        from cwac.schema import ConfigError

        flags = (bool(node.weight.enabled), bool(node.activation.enabled))
        if cls.required is not None and flags != cls.required:
            raise ConfigError(f"config {key}={node.name} needs {key}.weight.enabled={cls.required[0]} and "
                              f"{key}.activation.enabled={cls.required[1]}, got {flags[0]} and {flags[1]}; use "
                              f"method=cwac to combine the constraints freely")
        if not any(flags):
            raise ConfigError(f"config {key}={node.name} with {key}.weight.enabled=false and {key}.activation.enabled="
                              "false is plain SFT; use method=sft")
        if flags[0]:
            from cwac.constraints.input_projection import PROJECT_AT

            if node.weight.project_at not in PROJECT_AT:
                raise ConfigError(f"config {key}.weight.project_at={node.weight.project_at!r} is not valid; valid "
                                  f"values: {', '.join(PROJECT_AT)}")
            tc = cfg.training
            try:
                check_mode(node.weight.mode, int(tc.zero_stage), str(tc.precision), float(tc.weight_decay))
            except ValueError as e:
                raise ConfigError(f"config {key}.weight.mode={node.weight.mode!r}: {e}") from None
        corpus = node.sae.corpus
        if corpus.get("harmful_extra") is not None:
            from cwac.constraints.sae_corpus import check_harmful_extra

            check_harmful_extra(corpus.harmful_extra, f"{key}.sae.corpus.harmful_extra")
        if not cfg.offline:
            return
        if corpus.get("benign_source") == "hub":
            raise ConfigError(f"config {key}.sae.corpus.benign_source=hub streams the SAE's benign text from the hub "
                              f"({OmegaConf.select(corpus, 'hub.dataset')}), and the run is offline; run with "
                              f"offline=false, or set {key}.sae.corpus.benign_source=alpaca")
        if corpus.get("harmful_extra") is not None:
            raise ConfigError(f"config {key}.sae.corpus.harmful_extra reads more harmful prompts for the SAE from the "
                              f"hub ({corpus.harmful_extra.dataset}), and the run is offline; run with offline=false, "
                              f"or set {key}.sae.corpus.harmful_extra=null")

    def __init__(self, cfg: DictConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.use_weight = bool(cfg.weight.enabled)
        self.use_act = bool(cfg.activation.enabled)
        self.zero_stage = int(ctx.training.zero_stage)
        self.weight: PartitionedWeightConstraint | None = None
        self.act: ActivationConstraint | None = None
        self.probes: dict[str, DriftProbe] = {}
        self.w0: dict[str, torch.Tensor] = {}
        self.ids: dict[str, list[list[int]]] = {}
        self.z_base_heldout: torch.Tensor | None = None
        self.targets: list[str] = []
        self.layers: list[int] = []
        self.history: dict[str, list[float]] = {}
        self._pending: dict[str, float] = {}
        self._last_step = -1
        self.warnings: list[str] = []
        self.info: dict = {"variant": self.variant, "config": _container(cfg)}

    @property
    def variant(self) -> str:
        return "cwac" if self.use_weight and self.use_act else ("weight_only" if self.use_weight else "act_only")

    # ------------------------------------------------------------------ offline pieces

    def prepare(self, model: torch.nn.Module) -> None:
        t_all = time.time()
        cfg, ctx = self.cfg, self.ctx
        if self.use_weight:  # before any artifact is built
            tc = ctx.training
            # ZeRO-3 is supported by both modes (cwac.constraints.partitioned); the remaining refusal
            # (ZeRO-0 mixed precision with weight decay in update mode) does not depend on stage 3
            check_mode(cfg.weight.mode, self.zero_stage, str(tc.precision), float(tc.weight_decay))
        store: ArtifactStore = ctx.store
        tok, fmt = ctx.tokenizer, ctx.formatter
        self.pad = pad_id(tok)
        self.bs = int(cfg.prompts.batch_size)
        timings: dict[str, float] = {}

        t = time.time()
        pool = build_pool(cfg.prompts, model, tok, fmt, store, ctx.start_model_path)
        self.pool = pool
        timings["pool"] = time.time() - t
        max_tok = int(cfg.prompts.max_prompt_tokens)
        self.ids = {k: encode_prompts(fmt, getattr(pool, k), max_tok) for k in ("calibration", "reg", "heldout")}
        self.prefix = shared_prefix_len(self.ids["reg"] + self.ids["heldout"])
        self.keys = {"model": model_identity(ctx.start_model_path), "format": formatter_identity(fmt),
                     "max_prompt_tokens": max_tok}
        self.info["prompts"] = {**pool.info, "template_prefix_tokens": self.prefix}
        n_layers = len(decoder_layers(model))
        self.targets = parse_targets(cfg.weight.targets)
        self.layers = resolve_layers(cfg.weight.layers, n_layers)
        modules = find_targets(model, self.targets, self.layers)

        if self.use_weight:
            t = time.time()
            self._prepare_weight(model, modules, pool)
            timings["weight"] = time.time() - t
        dcfg = cfg.diagnostics
        self.info["zero_stage"] = self.zero_stage
        if self.use_act and int(dcfg.grad_norm_every) > 0 and self.zero_stage >= 3:
            self._warn("the task / safety gradient-norm diagnostics (diagnostics.grad_norm_every) are skipped under "
                       "ZeRO-3 (its parameters are partitioned placeholders outside DeepSpeed's own backward)")
        if dcfg.drift:   # post_train runs on the whole weights (the loop gathers them after ZeRO-3)
            t = time.time()
            self.w0 = (self.weight.w0 if self.weight is not None else
                       {n: m.weight.detach().clone().cpu() for n, m in modules.items() if not is_lora(m)})
            for part in ("heldout", "calibration"):
                probe = DriftProbe(self.ids[part], int(dcfg.drift_tokens), batch_size=self.bs, pad=self.pad,
                                   skip_tokens=self._skip(cfg.weight.mask_shared_prefix))
                probe.record(model, modules)
                self.probes[part] = probe
            timings["drift_probe"] = time.time() - t
        if self.use_act or dcfg.latent_drift:
            t = time.time()
            self._prepare_activation(model, n_layers, pool)
            timings["activation"] = time.time() - t
        if self.use_weight and self.weight.mode == "grad" and float(ctx.training.weight_decay) > 0:
            self._warn("weight.mode=grad with training.weight_decay > 0: decoupled weight decay moves projected "
                       "weights inside the protected subspace (docs/method.md §3.4); set training.weight_decay=0")
        timings["total"] = time.time() - t_all
        self.info["prepare_seconds"] = {k: round(v, 2) for k, v in timings.items()}

    def _skip(self, mask_prefix: bool, first: int = 0) -> int:
        return max(self.prefix if mask_prefix else 0, first)

    def _artifact(self, kind: str, key: dict, build) -> tuple:
        store: ArtifactStore = self.ctx.store
        reused = store.exists(kind, key)
        path = store.get_or_build(kind, key, build)
        meta = ArtifactStore.meta(path)
        return path, meta["meta"], {"path": str(path), "hash": meta["hash"], "reused": reused,
                                    "build_seconds": meta["build_seconds"]}

    def _prepare_weight(self, model, modules, pool) -> None:
        w = self.cfg.weight
        skip = self._skip(w.mask_shared_prefix)
        key = {**self.keys, "prompts": pool.hashes()["calibration"], "targets": self.targets, "layers": self.layers,
               "selection": w.selection, "energy": float(w.energy), "threshold": float(w.threshold),
               "null_tol": float(w.null_tol), "rank": w.rank, "cov_dtype": w.cov_dtype, "skip_tokens": skip}
        path, meta, art = self._artifact(
            "cwac_subspace", key,
            lambda out: build_subspaces(out, model, self.ids["calibration"], modules, w, batch_size=self.bs,
                                        pad=self.pad, skip_tokens=skip))
        dcfg = self.cfg.diagnostics
        dtype = next(model.parameters()).dtype
        subspaces, basis_info = store_bases(load_subspaces(path, meta), dtype, w.mode, float(w.basis_tol))
        self.weight = PartitionedWeightConstraint(subspaces, w.mode, self.zero_stage,
                                                  keep_w0_for_diagnostics=bool(dcfg.drift) or int(dcfg.leak_every) > 0)
        self.weight.attach(model)
        projected_at = self.weight.project_inputs(model, w.project_at, self.zero_stage)
        ranks = {s: v["rank"] for s, v in meta["sites"].items()}
        fracs = [v["rank"] / v["d_in"] for v in meta["sites"].values()]
        self.info["subspace"] = {**art, "n_tokens": meta["n_tokens"], "n_prompts": meta["n_prompts"],
                                 "mode": w.mode, "lora": self.weight.lora, "n_maps": len(modules),
                                 "project_at": w.project_at,
                                 "projected_at": {k: sum(v == k for v in projected_at.values())
                                                  for k in sorted(set(projected_at.values()))},
                                 "w0": self.weight.w0_device,
                                 "basis_dtype": sorted({v["dtype"] for v in basis_info.values()}),
                                 "basis_projection_error_max": max(v["projection_error"] for v in basis_info.values()),
                                 "n_sites": len(meta["sites"]), "rank_by_site": ranks,
                                 "rank_fraction_mean": round(sum(fracs) / len(fracs), 4),
                                 "rank_fraction_min": round(min(fracs), 4), "rank_fraction_max": round(max(fracs), 4),
                                 "energy_kept_min": min(v["energy_kept"] for v in meta["sites"].values())}

    def _prepare_activation(self, model, n_layers: int, pool) -> None:
        a, s = self.cfg.activation, self.cfg.sae
        sel = a.selection
        if s.source == "train":
            layer = resolve_layer(a.layer, float(a.relative_depth), n_layers)
            sae_key, sae_art, sae_meta = self._train_sae(model, layer, pool)
            sae = load_sae(s, Path(sae_art["path"]))
        else:
            sae = load_sae(s)
            hook = getattr(sae.cfg.metadata, "hook_name", None)
            hook_layer = layer_from_hook_name(hook)
            if a.layer is None and hook_layer is None:
                raise ValueError(f"cannot read the SAE's layer from its hook name {hook!r}; set method.activation.layer "
                                 "to the decoder block whose output the SAE reads")
            layer = resolve_layer(a.layer if a.layer is not None else hook_layer, 0.5, n_layers)
            weights = Path(str(s.path)) / "sae_weights.safetensors" if s.source == "disk" else None
            sae_key = {"source": s.source, "path": s.path, "release": s.release, "sae_id": s.sae_id,
                       "sha256": file_sha256(weights) if weights is not None and weights.exists() else None}
            sae_art, sae_meta = {**sae_key, "hook_name": hook}, {}
        d_model = int(hf_model(model).config.hidden_size)
        if sae.cfg.d_in != d_model:
            raise ValueError(f"the SAE reads {sae.cfg.d_in}-dim activations but the model's residual stream is "
                             f"{d_model}-dim; use an SAE trained on this model")
        skip = self._skip(bool(s.corpus.mask_shared_prefix), int(s.corpus.skip_first_tokens))
        harmless = self._harmless_prompts(sel)
        key = {**self.keys, "sae": sae_key, "layer": layer, "reg": pool.hashes()["reg"],
               "heldout": pool.hashes()["heldout"], "harmless": stable_hash(harmless), "criterion": sel.criterion,
               "values": sel["values"], "n_latents": int(a.n_latents), "pooling": a.pooling, "skip_tokens": skip}
        path, meta, art = self._artifact("cwac_latents", key,
                                         lambda out: self._build_latents(out, model, sae, layer, harmless, skip))
        from safetensors.torch import load_file

        t = load_file(str(path / "latents.safetensors"))
        selected = t["selected"].long()
        self.z_base_heldout = t["z_base_heldout"]
        early = bool(a.early_exit) and self.zero_stage < 3
        # training.packing packs the regulariser's prompts too, the chat template's shared start once
        packed = self.prefix if self.ctx.training.packing else None
        self.act = ActivationConstraint(SafetyLatents(sae, selected), layer, self.ids["reg"], t["z_base_reg"], a,
                                        self.pad, skip, early_exit=early, packed_prefix=packed)
        self.info["activation_batch"] = ("padded" if packed is None else
                                         f"packed, the first {packed} tokens (shared template start) once")
        self.info["sae"] = {**sae_art, **{k: v for k, v in sae_meta.items() if k != "train"},
                            "train": sae_meta.get("train"), "layer": layer, "d_sae": int(sae.cfg.d_sae),
                            "architecture": sae.cfg.architecture(),
                            "rescale_acts_by_decoder_norm": bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)),
                            "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input)}
        self.info["latents"] = {**art, **meta, "layer": layer, "early_exit": early, "in_loss": self.use_act}

    def _harmless_prompts(self, sel) -> list[str]:
        from cwac.data.harmful import prompt_set

        prompts = list(prompt_set(sel.harmless_set))[: int(sel.n_harmless)]
        if not prompts:
            raise ValueError(f"harmless set {sel.harmless_set!r} is empty")
        return prompts

    def _train_sae(self, model, layer: int, pool):
        s = self.cfg.sae
        c = s.corpus
        skip = self._skip(bool(c.mask_shared_prefix), int(c.skip_first_tokens))
        sae_cfg = {k: v for k, v in _container(s).items() if k not in ("source", "path", "release", "sae_id")}
        for k in ("harmful_extra", "chunk_tokens"):   # null: the corpus as before the keys existed (the same key)
            if sae_cfg["corpus"].get(k, 0) is None:
                del sae_cfg["corpus"][k]
        key = {**self.keys, "layer": layer, "reg": pool.hashes()["reg"], "sae": sae_cfg, "skip_tokens": skip,
               "task": self.ctx.task if c.benign_source == "task" else None}
        if c.get("harmful_extra") is not None:   # which extra prompts survive: the pool's refusal filter and heldout
            p = self.cfg.prompts
            key["harmful_extra_filter"] = {"filter_refused": bool(p.filter_refused),
                                           "max_new_tokens": int(p.refusal_max_new_tokens),
                                           "min_refused_fraction": float(p.min_refused_fraction),
                                           "heldout": pool.hashes()["heldout"]}
        path, meta, art = self._artifact("cwac_sae", key, lambda out: self._build_sae(out, model, layer, skip))
        return {"artifact": f"cwac_sae/{art['hash']}"}, art, meta

    def _build_sae(self, out, model, layer: int, skip: int) -> dict:
        """Train the SAE on the corpus of ``cwac.constraints.sae_corpus``: the pool's harmful prompts
        (plus ``corpus.harmful_extra``) and benign rows, their residuals regenerated chunk by chunk
        (``corpus.chunk_tokens``; null: one chunk holding everything)."""
        s = self.cfg.sae
        c = s.corpus
        extra, extra_info = self._extra_harmful(model) if c.get("harmful_extra") is not None else ([], None)
        n_reg = len(self.ids["reg"])

        def collect(id_lists, last=None):
            return collect_residuals(model, layer, id_lists, batch_size=self.bs, pad=self.pad, skip_tokens=skip,
                                     last=last)

        rows = benign_examples(c, int(s.seed), self.ctx.task)
        benign_ids = (encode_conversations(self.ctx.formatter, [e], int(c.max_len))[0] for e in rows)
        stream = ResidualStream(collect, self.ids["reg"] + extra, benign_ids, d=int(hf_model(model).config.hidden_size),
                                skip=skip, tokens=int(c.tokens), harmful_fraction=float(c.harmful_fraction),
                                chunk_tokens=c.get("chunk_tokens"))
        first = stream.next_chunk(keep_last=True)
        harm, benign = first.harmful, first.benign
        if first.harmful_index[:n_reg] == list(range(n_reg)):   # every pool prompt is in the first chunk
            self._reg_last = (layer, torch.stack(first.last[:n_reg]))  # reused by _build_latents (pooling=last)
        del first
        h_tr, h_ev = split_eval(harm, float(s.train.eval_fraction), int(s.seed))
        b_tr, b_ev = split_eval(benign, float(s.train.eval_fraction), int(s.seed)) if len(benign) else (benign, benign)
        d_in = int(harm.shape[1])
        del harm, benign   # the stream's batches hold the first chunk's training part, and free it for the next
        bs = int(s.train.batch_size)
        batches = stream.batches(h_tr, b_tr, bs, int(s.seed))
        del h_tr, b_tr   # held by the batches alone from here
        empty = torch.zeros(0, d_in)
        sae, tinfo = train_topk_sae(empty, empty, s, int(s.seed), batches=batches)
        del batches
        sae.save_inference_model(str(out / "sae"))
        inf = load_sae(s, out)
        meta = {"layer": layer, "d_in": d_in, "d_sae": int(inf.cfg.d_sae), "k": int(s.k),
                "tokens": {"harmful": stream.rows["harmful"], "benign": stream.rows["benign"],
                           "harmful_prompts": n_reg + len(extra), "benign_rows": stream.benign_rows},
                "quality_heldout_harmful": sae_quality(inf, h_ev), "quality_heldout_benign": sae_quality(inf, b_ev),
                "train": tinfo}
        if c.get("chunk_tokens") is not None:
            meta["chunks"] = stream.info()
        if extra_info is not None:
            meta["harmful_extra"] = extra_info
        return meta

    def _extra_harmful(self, model) -> tuple[list[list[int]], dict]:
        """Token ids of ``sae.corpus.harmful_extra``'s prompts that the aligned model refuses (module
        doc of ``cwac.constraints.sae_corpus``), outside the pool and every evaluation set."""
        ctx, pool = self.ctx, self.pool
        prompts, info = extra_harmful_prompts(self.cfg.sae.corpus.harmful_extra, pool.reg + pool.heldout,
                                              int(self.cfg.sae.seed))
        prompts, finfo = refused_prompts(prompts, model, ctx.tokenizer, ctx.formatter, self.cfg.prompts, ctx.store,
                                         ctx.start_model_path)
        if not prompts:
            raise ValueError(f"method.sae.corpus.harmful_extra ({info['dataset']} {info['split']}) left no prompt after "
                             "the evaluation-set and refusal filters; set method.sae.corpus.harmful_extra=null")
        info = {**info, **finfo, "n_used": len(prompts)}
        return encode_prompts(ctx.formatter, prompts, int(self.cfg.prompts.max_prompt_tokens)), info

    def _build_latents(self, out, model, sae, layer: int, harmless: list[str], skip: int) -> dict:
        from safetensors.torch import save_file

        a = self.cfg.activation
        sel = a.selection
        fns = {"relu_pre": all_latents(sae), "topk": sae.encode}
        if sel["values"] not in fns:
            raise ValueError(f"activation.selection.values must be 'topk' or 'relu_pre', got {sel['values']!r}")
        h_ids = encode_prompts(self.ctx.formatter, harmless, int(self.cfg.prompts.max_prompt_tokens))
        kw = dict(batch_size=self.bs, pad=self.pad, skip_tokens=skip)
        cached = getattr(self, "_reg_last", None)
        if a.pooling == "last" and cached is not None and cached[0] == layer:
            with torch.no_grad():
                harm = {k: fn(cached[1]) for k, fn in fns.items()}  # same forward as the SAE corpus
        else:
            harm = prompt_latents(model, layer, self.ids["reg"], fns, a.pooling, **kw)
        safe = prompt_latents(model, layer, h_ids, fns, a.pooling, **kw)
        scores = selection_scores(harm[sel["values"]], safe[sel["values"]], sel.criterion)
        selected = select_latents(scores, int(a.n_latents))
        latents = SafetyLatents(sae, selected)
        z_reg = harm["relu_pre"][:, selected].contiguous()
        z_held = prompt_latents(model, layer, self.ids["heldout"], {"z": latents}, a.pooling, **kw)["z"]
        save_file({"selected": selected, "scores": scores.float(), "z_base_reg": z_reg, "z_base_heldout": z_held},
                  str(out / "latents.safetensors"))
        active_h = (harm["topk"][:, selected] > 0).float().mean()
        active_s = (safe["topk"][:, selected] > 0).float().mean()
        return {"n_selected": len(selected), "n_harmful": len(self.ids["reg"]), "n_harmless": len(h_ids),
                "score_selected_min": float(scores[selected].min()), "score_selected_max": float(scores[selected].max()),
                "topk_active_rate_harmful": round(float(active_h), 4),
                "topk_active_rate_harmless": round(float(active_s), 4),
                "z_base_norm_mean": float(z_reg.norm(dim=-1).mean())}

    def _warn(self, msg: str) -> None:
        log.warning("CWAC: %s", msg)
        self.warnings.append(msg)

    # ------------------------------------------------------------------ training hooks

    def grad_hooks(self, model):
        return self.weight.grad_hooks(model) if self.weight is not None else {}

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        every = int(self.cfg.diagnostics.grad_norm_every)
        norms = (self.act is not None and self.use_act and every > 0 and step != self._last_step and step % every == 0
                 and self.zero_stage < 3)   # autograd.grad w.r.t. ZeRO-3's empty placeholders is not defined
        # DeepSpeed hooks the outputs of engine.forward so that only engine.backward may run their
        # backward; the diagnostic autograd.grad calls therefore use the module's own forward.
        task = self.task_loss(getattr(model, "module", model) if norms else model, batch)
        losses, metrics = {"task": task}, {}
        if self.act is not None and self.use_act:
            if self.act.calls == 0 and torch.distributed.is_initialized():
                self.act.rank, self.act.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            safety, m = self.act.loss(model)
            losses["cwac_safety"] = safety
            metrics.update(m)
            if norms:
                self._pending.update(self._grad_norms(model, task, safety))
        self._last_step = step
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        return LossOutput(losses, metrics)

    @staticmethod
    def _grad_norms(model, task: torch.Tensor, safety: torch.Tensor) -> dict[str, float]:
        """Gradient norms of the task and the (weighted) safety term, each alone (docs/organism.md: scale)."""
        params = [p for p in model.parameters() if p.requires_grad]
        out = {}
        for name, loss in (("grad_norm_task", task), ("grad_norm_safety", safety)):
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            out[name] = float(torch.sqrt(sum(g.float().pow(2).sum() for g in gs if g is not None)))
        return out

    def after_step(self, model, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.weight is not None:
            if self.weight.mode == "update":
                out.update(self.weight.apply_update(model))
            every = int(self.cfg.diagnostics.leak_every)
            if every and (step + 1) % every == 0:
                out.update(self.weight.leak(model))
        out.update(self._pending)
        self._pending = {}
        for k, v in out.items():
            self.history.setdefault(k, []).append(v)
        return out

    @torch.no_grad()
    def post_train(self, model):
        """End-of-training diagnostics: per-map drift on held-out and calibration prompts, latent drift."""
        t = time.time()
        diag: dict = {}
        if self.weight is not None:
            leak = self.weight.leak(model)
            if "proj_leak" in leak:   # needs W₀ (not kept in grad mode without diagnostics)
                diag["proj_leak_final"] = leak["proj_leak"]
        if self.probes:
            modules = find_targets(model, self.targets, self.layers)
            w0 = OnDevice(self.w0, next(model.parameters()).device)   # one map's W₀ on the device at a time
            for part, probe in self.probes.items():
                diag[f"map_drift_{part}"] = probe.measure(model, modules, w0)
        if self.act is not None:
            diag["latent_drift_heldout"] = self.act.drift(model, self.ids["heldout"], self.z_base_heldout, self.bs)
            n = min(len(self.ids["reg"]), len(self.ids["heldout"]))
            diag["latent_drift_reg"] = self.act.drift(model, self.ids["reg"][:n], self.act.z_base[:n], self.bs)
        diag["seconds"] = round(time.time() - t, 2)
        self.info["diagnostics"] = diag
        if self.weight is not None:
            self.weight.release(model)   # the maps' own forward for evaluation and saving
        return model

    def record_info(self) -> dict:
        summary = {}
        for k, v in self.history.items():
            if v:
                summary[k] = {"first": v[0], "last": v[-1], "mean": sum(v) / len(v), "n": len(v)}
        return {**self.info, "train_metrics": summary, "warnings": self.warnings}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """CWAC's own tensors (docs/scale.md): per-site covariances built one at a time on the device
        (``weight.cov_dtype``) and eigendecomposed on the CPU in float64; the stored bases in the model
        dtype (at most ``d_in/2`` columns a site: the free complement is stored beyond); W0 in update
        mode only; the SAE on the device in the model dtype, trained in fp32 on the residual corpus;
        the regulariser's extra forward of ``batch_prompts`` prompts through block l*."""
        from cwac.constraints.activations import resolve_layer
        from cwac.memory import activation_components, key

        s, b = spec.shapes, spec.dtype_bytes
        w, a, sae = cfg.weight, cfg.activation, cfg.sae
        out: dict[str, int] = {}
        if bool(w.enabled):
            targets = parse_targets(w.targets)
            n_layers = len(resolve_layers(w.layers, s.n_layers))
            shared = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                      "up_proj": "mlp_in"}
            sites = {shared.get(t, t): s.linear(t)[1] for t in targets}   # site -> d_in
            rank = w.get("rank") if w.selection == "rank" else None
            cols = {site: min(int(rank), d - int(rank)) if rank is not None else d // 2 for site, d in sites.items()}
            d_big = max(sites.values())
            cov_b = 8 if w.cov_dtype == "float64" else 4
            out[key("covariance of one input site", "prepare")] = d_big * d_big * cov_b
            out[key("eigendecomposition (float64: matrix, eigenvectors, workspace)", "prepare", host=True)] = 3 * d_big * d_big * 8
            out[key(f"bases U ({n_layers} layers x {len(sites)} sites, model dtype, <= d_in/2 columns)")] = \
                n_layers * sum(d * cols[site] for site, d in sites.items()) * b
            o, i = max((s.linear(t) for t in targets), key=lambda oi: oi[0] * oi[1])
            out[key("gradient projection of one map (fp32)")] = (2 * o * i + o * max(cols.values())) * 4
            if w.mode == "update":   # PartitionedWeightConstraint: model dtype, whole; on the host under ZeRO-3
                out[key("W0 of the constrained maps (model dtype, update mode)", host=spec.zero_stage >= 3)] = \
                    n_layers * sum(s.linear(t)[0] * s.linear(t)[1] for t in targets) * b
        diag = bool(cfg.diagnostics.drift) or int(cfg.diagnostics.leak_every) > 0
        if diag and not (bool(w.enabled) and w.mode == "update"):   # grad mode: a host copy for the diagnostics
            targets = parse_targets(w.targets)
            n_layers = len(resolve_layers(w.layers, s.n_layers))
            out[key("drift / leak diagnostics: W0 copies (model dtype, CPU)", host=True)] = \
                n_layers * sum(s.linear(t)[0] * s.linear(t)[1] for t in targets) * spec.dtype_bytes
        if bool(a.enabled) or bool(cfg.diagnostics.latent_drift):
            d_sae = int(sae.expansion) * s.d_model
            n_sae = 2 * d_sae * s.d_model + d_sae + s.d_model
            out[key(f"SAE {s.d_model} x {d_sae} (model dtype)")] = n_sae * b
            if sae.source == "train":
                bs = int(sae.train.batch_size)
                out[key("SAE training: fp32 weights, gradients, Adam moments, one batch", "prepare")] = \
                    n_sae * 16 + bs * d_sae * 4 * 4
                from cwac.data.harmful import held_in_harmful_prompts

                pool = int(cfg.prompts.n_train or len(held_in_harmful_prompts()) - int(cfg.prompts.n_heldout))
                c = sae.corpus
                extra = c.get("harmful_extra")   # n_prompts null: bounded by a 30k-row split
                n_extra = 0 if extra is None else int(extra.n_prompts) if extra.n_prompts is not None else 30000
                n_res = int((1 - float(c.harmful_fraction)) * int(c.tokens)) \
                    + (pool + n_extra) * int(cfg.prompts.max_prompt_tokens)   # benign + every harmful prompt token (bound)
                what = "residuals"
                if c.get("chunk_tokens") is not None:   # one chunk, each side one sequence over (sae_corpus.ResidualStream)
                    chunk = int(c.chunk_tokens) + int(cfg.prompts.max_prompt_tokens) + int(c.max_len)
                    n_res, what = min(n_res, chunk), "residuals, one chunk"
                out[key(f"SAE corpus: {n_res} {what} (fp32, CPU)", "prepare", host=True)] = n_res * s.d_model * 4
        if bool(a.enabled):
            layer = resolve_layer(a.layer, float(a.relative_depth), s.n_layers)
            n_tok = int(a.batch_prompts) * int(cfg.prompts.max_prompt_tokens)
            for c in activation_components(spec, tokens=n_tok, layers=layer + 1, with_head=False,
                                           label="regulariser forward"):
                out[key(f"{c.name} ({n_tok} prompt tokens through block {layer})")] = c.bytes
            if int(cfg.diagnostics.grad_norm_every) > 0:   # two autograd.grad sets before .grad exists
                from cwac.memory import finetune_components

                held = sum(c.bytes for c in finetune_components(spec) if c.where == "device"
                           and c.name in ("gradients", "gradient reduce bucket"))
                out[key("grad-norm diagnostics: two full gradient sets, beyond the gradients they precede")] = \
                    max(0, 2 * spec.trainable * b - held)
        return out


class CWACWeightOnly(CWAC):
    """Ablation: the weight (subspace-projection) constraint alone (docs/method.md §7.4)."""

    required = (True, False)


class CWACActOnly(CWAC):
    """Ablation: the SAE-latent activation constraint alone (docs/method.md §7.4)."""

    required = (False, True)
