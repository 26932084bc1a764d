"""CWAC's activation constraint: SAE safety latents held at their aligned values (docs/method.md §4).

Offline (each piece an artifact):

1. **SAE** [reported: TopK SAE on the residual stream; inferred: one mid-depth layer]. A TopK
   SAE (Gao et al., arXiv 2406.04093) trained with sae-lens' ``TopKTrainingSAE`` +
   ``SAETrainer`` on the aligned model's residual stream after block ``l*`` over a mix of
   benign text and refused harmful prompts (paper: 30% / 70% of tokens). The activations
   are collected chunk by chunk (``cwac.constraints.sae_corpus``: all at once on CPU) and the
   trainer samples each batch in the configured proportion.
   Alternatively a sae-lens SAE is loaded from disk (``SAE.load_from_disk``) or from a
   pretrained release (needs the hub).
2. **Safety latents** [reported: top 100; inferred: criterion]. Latents ranked by the contrast
   of their pooled activation on harmful (regularisation-pool) vs harmless
   (``rd_harmless_train``) prompts; ``criterion`` = ``mean_diff`` | ``t_stat`` | ``freq_ratio``,
   on the SAE's TopK codes (``values: topk``) or on ``relu_pre`` (below).
3. **Baselines** ``z_base`` of the selected latents on every regularisation and held-out
   prompt, from the aligned model.

Per step: ``L_safety = mean_b Σ_{j∈S} (z_j(h_b) − z_base_j(h_b))²`` over ``B`` prompts cycled
from the pool, added as ``λ · L_safety``. ``z`` is the **pre-TopK ReLU pre-activation** of the
selected latents (docs/method.md §4.5): ``ReLU((process_sae_in(x) @ W_enc[:, S] + b_enc[S]) ·
‖W_dec[S]‖)``, the norm factor only when the SAE config sets ``rescale_acts_by_decoder_norm``.
``process_sae_in`` is the SAE's own method (activation normalisation, ``b_dec`` subtraction
when ``apply_b_dec_to_input``), so the input processing is the SAE's exactly. Wherever the
SAE's TopK keeps a selected latent, ``z`` equals its code; where TopK drops it, ``z`` still
carries a gradient (no dead penalty). The SAE is frozen; the forward stops after block ``l*``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from cwac.constraints.activations import (PackedPromptBatch, PromptBatch, forward_quietly, iter_batches, make_batch,
                                          make_packed_batch, residual_capture)
from cwac.modeling import hf_model, model_device

log = logging.getLogger(__name__)

CRITERIA = ("mean_diff", "t_stat", "freq_ratio")
POOLINGS = ("last", "mean")
REDUCTIONS = ("sum_latents_mean_prompts", "mean", "sum")
SUPPORTED_ARCH = ("topk", "standard", "jumprelu")


# ----------------------------------------------------------------------------- latent values

class SafetyLatents:
    """``z_S(x)``: pre-TopK ReLU pre-activations of the selected latents (module doc).

    Args:
        sae: a sae-lens SAE (inference or training class), frozen here.
        selected: latent indices ``S``.
    """

    def __init__(self, sae, selected: torch.Tensor):
        arch = sae.cfg.architecture()
        if arch not in SUPPORTED_ARCH:
            raise ValueError(f"SAE architecture {arch!r} is not supported for the latent constraint "
                             f"(supported: {', '.join(SUPPORTED_ARCH)})")
        sae.requires_grad_(False)
        sae.eval()
        self.sae = sae
        self.idx = selected.long()
        self.W = sae.W_enc.detach()[:, self.idx].clone()
        self.b = sae.b_enc.detach()[self.idx].clone()
        self.scale = (sae.W_dec.detach()[self.idx].norm(dim=-1).clone()
                      if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.W.device != x.device:  # follow the model (GPU runs): move once, not every step
            self.sae = self.sae.to(x.device)
            self.W, self.b = self.W.to(x.device), self.b.to(x.device)
            self.scale = self.scale.to(x.device) if self.scale is not None else None
        h = self.sae.process_sae_in(x)
        pre = h @ self.W + self.b
        if self.scale is not None:
            pre = pre * self.scale
        return torch.relu(pre)


def all_latents(sae) -> SafetyLatents:
    return SafetyLatents(sae, torch.arange(sae.cfg.d_sae))


def pool(values: torch.Tensor, batch: PromptBatch, pooling: str) -> torch.Tensor:
    """[B, T, m] -> [B, m]: the last prompt position (left padding) or a masked mean."""
    if pooling == "last":
        return values[:, -1]
    if pooling == "mean":
        m = batch.token_mask.unsqueeze(-1).to(values.dtype)
        return (values * m).sum(1) / m.sum(1).clamp_min(1)
    raise ValueError(f"activation.pooling must be one of {POOLINGS}, got {pooling!r}")


def batch_latents(model, layer: int, batch: PromptBatch | PackedPromptBatch, fn, pooling: str,
                  early_exit: bool = True) -> torch.Tensor:
    """Pooled ``fn(resid_l*)`` for one prompt batch, padded or packed (keeps the graph; caller
    decides on grad)."""
    with residual_capture(model, layer, early_exit) as store:
        forward_quietly(model, batch)
    resid = store["resid"]
    if isinstance(batch, PackedPromptBatch):
        return _packed_pool(fn, resid[0], batch, pooling)
    if pooling == "last":
        return fn(resid[:, -1])
    values = fn(resid)
    values = torch.where(batch.token_mask.unsqueeze(-1), values, torch.zeros_like(values))  # pads may hold NaN
    m = batch.token_mask.unsqueeze(-1).to(values.dtype)
    return values.sum(1) / m.sum(1).clamp_min(1)


def _packed_pool(fn, resid: torch.Tensor, batch: PackedPromptBatch, pooling: str) -> torch.Tensor:
    """[B, m] from the packed row's residuals [T, d]: each prompt's last position, or the mean over
    its counted positions, the shared prefix's counted positions included in every prompt's mean."""
    if pooling == "last":
        return fn(resid[batch.last])
    values = fn(resid)
    values = torch.where(batch.token_mask.unsqueeze(-1), values, torch.zeros_like(values))
    own = batch.seq_idx >= 0
    sums = values.new_zeros(batch.n_prompts, values.shape[-1]).index_add(0, batch.seq_idx[own], values[own])
    counts = torch.zeros(batch.n_prompts, dtype=values.dtype, device=values.device).index_add(
        0, batch.seq_idx[own], batch.token_mask[own].to(values.dtype))
    shared = ~own
    sums = sums + values[shared].sum(0, keepdim=True)
    counts = counts + batch.token_mask[shared].to(values.dtype).sum()
    return sums / counts.clamp_min(1).unsqueeze(-1)


@torch.no_grad()
def prompt_latents(model, layer: int, id_lists: Sequence[Sequence[int]], fns: dict, pooling: str, *,
                   batch_size: int, pad: int, skip_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Pooled values ``{name: [n_prompts, m]}`` (input order) of several latent functions."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: dict[str, list] = {k: [None] * len(id_lists) for k in fns}
    try:
        for idx, batch in iter_batches(id_lists, batch_size, pad, skip_tokens):
            batch = batch.to(device)
            with residual_capture(model, layer) as store:
                forward_quietly(model, batch)
            resid = store["resid"]
            for k, fn in fns.items():
                if pooling == "last":
                    v = fn(resid[:, -1])
                else:
                    v = fn(resid)
                    v = torch.where(batch.token_mask.unsqueeze(-1), v, torch.zeros_like(v))
                    v = v.sum(1) / batch.token_mask.sum(1, keepdim=True).clamp_min(1).to(v.dtype)
                for j, i in enumerate(idx):
                    out[k][i] = v[j].float().cpu()
    finally:
        model.train(was_training)
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- SAE corpus + training

@torch.no_grad()
def collect_residuals(model, layer: int, id_lists: Sequence[Sequence[int]], *, batch_size: int, pad: int,
                      skip_tokens: int, last: list | None = None) -> torch.Tensor:
    """Residual-stream vectors after block ``layer`` at every counted token ([N, d_model], float32).

    With ``last`` (a list of ``len(id_lists)`` slots) the last-position vector of each sequence
    is stored there too (input order), so latent selection can reuse this forward pass.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for idx, batch in iter_batches(id_lists, batch_size, pad, skip_tokens):
            batch = batch.to(device)
            with residual_capture(model, layer) as store:
                forward_quietly(model, batch)
            chunks.append(store["resid"][batch.token_mask].float().cpu())
            if last is not None:
                for j, i in enumerate(idx):
                    last[i] = store["resid"][j, -1].float().cpu()
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0)


def mixed_batches(harmful: torch.Tensor, benign: torch.Tensor, harmful_fraction: float, batch_size: int,
                  seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches, ``round(f · batch)`` rows from ``harmful``, the rest from ``benign``.

    Each source is walked through fresh permutations (epochs), so a short source is repeated
    rather than under-weighted: the mix is by tokens, as in the paper's 30/70 corpus.
    """
    g = torch.Generator().manual_seed(seed)
    n_h = round(harmful_fraction * batch_size) if len(benign) else batch_size
    n_b = batch_size - n_h
    if n_h and not len(harmful):
        raise ValueError("the SAE corpus has no harmful tokens")

    def stream(x: torch.Tensor):
        while True:
            yield from torch.randperm(len(x), generator=g).tolist()

    sh = stream(harmful) if n_h else None
    sb = stream(benign) if n_b else None
    while True:
        parts = []
        if n_h:
            parts.append(harmful[[next(sh) for _ in range(n_h)]])
        if n_b:
            parts.append(benign[[next(sb) for _ in range(n_b)]])
        yield torch.cat(parts)


def split_eval(x: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_eval = int(frac * len(x))
    return x[perm[n_eval:]], x[perm[:n_eval]]


@torch.no_grad()
def sae_quality(sae, acts: torch.Tensor) -> dict:
    """Fraction of variance explained, mean L0 and the share of latents that never fire on ``acts``."""
    if not len(acts):
        return {}
    codes = sae.encode(acts)
    rec = sae.decode(codes)
    fve = 1 - float((rec - acts).pow(2).sum()) / float((acts - acts.mean(0)).pow(2).sum())
    fired = (codes > 0).any(0)
    return {"fve": round(fve, 4), "l0": round(float((codes > 0).float().sum(-1).mean()), 2),
            "dead_fraction": round(1 - float(fired.float().mean()), 4), "n_eval_tokens": len(acts)}


def train_topk_sae(harmful: torch.Tensor, benign: torch.Tensor, scfg: DictConfig, seed: int,
                   batches: Iterator[torch.Tensor] | None = None):
    """Train a sae-lens TopK SAE on the mixed corpus; returns (training SAE, metrics).

    ``batches``: the training batches (``cwac.constraints.sae_corpus.ResidualStream.batches``, a
    corpus served chunk by chunk); None: ``mixed_batches`` of ``harmful`` and ``benign``, held whole.
    ``harmful`` gives the residual width either way."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    d_in = harmful.shape[1]
    t = scfg.train
    device = str(t.device) if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=int(scfg.expansion) * d_in, k=int(scfg.k), dtype="float32", device=device,
        apply_b_dec_to_input=bool(scfg.apply_b_dec_to_input), normalize_activations=str(scfg.normalize_activations),
        rescale_acts_by_decoder_norm=bool(scfg.rescale_acts_by_decoder_norm),
        aux_loss_coefficient=float(scfg.aux_loss_coefficient), decoder_init_norm=scfg.decoder_init_norm))
    steps, bs = int(t.steps), int(t.batch_size)
    tcfg = SAETrainerConfig(
        total_training_samples=steps * bs, train_batch_size_samples=bs, lr=float(t.lr), lr_end=float(t.lr) * float(t.lr_end_factor),
        lr_scheduler_name=str(t.lr_scheduler), lr_warm_up_steps=int(t.warmup_steps), lr_decay_steps=int(t.decay_steps),
        device=device, dead_feature_window=int(t.dead_feature_window), feature_sampling_window=max(steps + 1, 2),
        n_batches_for_norm_estimate=int(t.norm_estimate_batches), logger=LoggingConfig(log_to_wandb=False))
    provider = batches if batches is not None else mixed_batches(harmful, benign, float(scfg.corpus.harmful_fraction),
                                                                 bs, seed)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
    trainer.fit()
    return sae.to("cpu"), {"steps": steps, "batch_size": bs, "samples": steps * bs, "device": device,
                           "dead_in_window": int(trainer.dead_neurons.sum())}


BENIGN_SOURCES = ("alpaca", "task", "hub")


def hub_benign_examples(hcfg, seed: int) -> Iterator:
    """Generic benign text for the SAE corpus, streamed from the hub (``sae.corpus.hub``: an
    OpenWebText-style corpus; the paper's is OpenWebText2, docs/method.md §4.1). Each document is
    one ``Example`` whose instruction is the text (the user turn, as the harmful prompts are),
    in a seeded streaming shuffle; blank documents are skipped. Needs ``offline=false``."""
    from datasets import load_dataset

    from cwac.data.examples import Example

    ds = load_dataset(str(hcfg.dataset), hcfg.name, split=str(hcfg.split), streaming=True)
    if int(hcfg.shuffle_buffer) > 1:
        ds = ds.shuffle(seed=seed, buffer_size=int(hcfg.shuffle_buffer))
    field = str(hcfg.text_field)
    for row in ds:
        text = str(row[field]).strip()
        if text:
            yield Example(text, "", "", f"hub:{hcfg.dataset}")


def benign_examples(ccfg: DictConfig, seed: int, task: str | None = None):
    """Benign rows for the SAE corpus (shuffled deterministically): Alpaca, the task's train rows,
    or (``hub``) a stream of generic web text that the caller reads until it has its tokens."""
    if ccfg.benign_source == "hub":
        if ccfg.get("hub") is None:
            raise ValueError("method.sae.corpus.benign_source=hub needs method.sae.corpus.hub (dataset, name, split, "
                             "text_field, shuffle_buffer), as in conf/method_budget/cwac/paper.yaml")
        return hub_benign_examples(ccfg.hub, seed)
    if ccfg.benign_source == "alpaca":
        from cwac.data.harmful import alpaca_examples

        rows = alpaca_examples()
    elif ccfg.benign_source == "task":
        from cwac.data.tasks import load_task

        rows = load_task(task, "train", None)
    else:
        raise ValueError(f"sae.corpus.benign_source must be one of {', '.join(BENIGN_SOURCES)}, got {ccfg.benign_source!r}")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def load_sae(scfg: DictConfig, trained_dir: Path | None = None):
    """The inference SAE: our trained one, a sae-lens folder on disk, or a pretrained release."""
    from sae_lens import SAE

    if trained_dir is not None:
        return SAE.load_from_disk(str(trained_dir / "sae"), device="cpu")
    if scfg.source == "disk":
        if not scfg.path or not Path(scfg.path).exists():
            raise FileNotFoundError(f"method.sae.source=disk needs method.sae.path to a sae-lens folder "
                                    f"(cfg.json + sae_weights.safetensors); got {scfg.path!r}")
        return SAE.load_from_disk(str(scfg.path), device="cpu")
    if scfg.source == "pretrained":
        if not scfg.release or not scfg.sae_id:
            raise ValueError("method.sae.source=pretrained needs method.sae.release and method.sae.sae_id")
        return SAE.from_pretrained(str(scfg.release), str(scfg.sae_id), device="cpu")
    raise ValueError(f"method.sae.source must be train, disk or pretrained, got {scfg.source!r}")


def layer_from_hook_name(hook: str | None) -> int | None:
    """Decoder block whose output a sae-lens hook name reads (``model.layers.N``,
    ``blocks.N.hook_resid_post``, ``blocks.N.hook_resid_pre`` = output of N-1)."""
    import re

    if not hook:
        return None
    if m := re.fullmatch(r"(?:model\.)?layers\.(\d+)", hook):
        return int(m.group(1))
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m.group(1))
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook):
        if int(m.group(1)) == 0:
            raise ValueError(f"the SAE reads {hook}, the embeddings before any decoder block; the latent "
                             "constraint needs a block's output (use an SAE of a later hook)")
        return int(m.group(1)) - 1
    return None


# ----------------------------------------------------------------------------- latent selection

def selection_scores(harm: torch.Tensor, harmless: torch.Tensor, criterion: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-latent harmful-vs-harmless score (higher = more harmful-specific)."""
    if criterion == "mean_diff":
        return harm.mean(0) - harmless.mean(0)
    if criterion == "t_stat":  # Welch's t
        vh, vl = harm.var(0, unbiased=True), harmless.var(0, unbiased=True)
        return (harm.mean(0) - harmless.mean(0)) / (vh / len(harm) + vl / len(harmless) + eps).sqrt()
    if criterion == "freq_ratio":
        fh, fl = (harm > 0).float().mean(0), (harmless > 0).float().mean(0)
        return (fh + eps) / (fl + eps) * (fh > 0)
    raise ValueError(f"activation.selection.criterion must be one of {CRITERIA}, got {criterion!r}")


def select_latents(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the top-``n`` latents with a positive score (fewer if fewer are positive)."""
    n = min(n, scores.numel())
    top = torch.topk(scores, n).indices
    top = top[scores[top] > 0]
    if not len(top):
        raise ValueError("no SAE latent is more active on harmful than on harmless prompts; check the SAE / layer")
    return top


# ----------------------------------------------------------------------------- regulariser

class ActivationConstraint:
    """The per-step safety term and the latent-drift measurements.

    Args:
        latents: the ``SafetyLatents`` of the selected latents.
        layer: residual-stream layer ``l*`` (output of that decoder block).
        reg_ids / z_base: token ids of the regularisation pool and their recorded values.
        packed_prefix: None for a left-padded prompt batch each step; else the batch is packed
            (``make_packed_batch``), holding the first ``packed_prefix`` tokens (the shared chat
            template start) once. The same term up to float rounding, computed on fewer tokens.
        acfg: the ``activation`` config node (lam, batch_prompts, pooling, reduction, scale).
        skip_tokens: positions left out of ``mean`` pooling (template prefix).
    """

    def __init__(self, latents: SafetyLatents, layer: int, reg_ids: list[list[int]], z_base: torch.Tensor,
                 acfg: DictConfig, pad: int, skip_tokens: int, early_exit: bool = True, rank: int = 0, world: int = 1,
                 packed_prefix: int | None = None):
        if acfg.reduction not in REDUCTIONS:
            raise ValueError(f"activation.reduction must be one of {REDUCTIONS}, got {acfg.reduction!r}")
        if acfg.pooling not in POOLINGS:
            raise ValueError(f"activation.pooling must be one of {POOLINGS}, got {acfg.pooling!r}")
        self.latents, self.layer, self.reg_ids, self.z_base = latents, layer, reg_ids, z_base
        self.lam = float(acfg.lam)
        self.B = int(acfg.batch_prompts)
        self.pooling, self.reduction = acfg.pooling, acfg.reduction
        self.pad, self.skip, self.early_exit = pad, skip_tokens, early_exit
        self.rank, self.world = rank, world
        self.packed_prefix = packed_prefix   # None: a left-padded batch; else packed, sharing this many tokens
        self.calls = 0
        if acfg.scale == "none":
            self.norm = 1.0
        elif acfg.scale == "base_energy":  # [inferred option] scale-free: divide by mean ||z_base||^2
            self.norm = float(z_base.pow(2).sum(-1).mean().clamp_min(1e-12))
        else:
            raise ValueError(f"activation.scale must be 'none' or 'base_energy', got {acfg.scale!r}")

    def next_indices(self) -> list[int]:
        """The next ``B`` pool prompts, cycled deterministically (distinct per micro-batch and rank)."""
        n = len(self.reg_ids)
        start = (self.calls * self.world + self.rank) * self.B
        self.calls += 1
        return [(start + i) % n for i in range(self.B)]

    def reduce(self, diff: torch.Tensor) -> torch.Tensor:
        sq = diff.pow(2)
        if self.reduction == "sum_latents_mean_prompts":
            out = sq.sum(-1).mean()
        elif self.reduction == "mean":
            out = sq.mean()
        else:
            out = sq.sum()
        return out / self.norm

    def loss(self, model) -> tuple[torch.Tensor, dict[str, float]]:
        """``(λ · L_safety, metrics)`` for the next prompt batch (graph kept for backward)."""
        idx = self.next_indices()
        ids = [self.reg_ids[i] for i in idx]
        if self.packed_prefix is None:
            batch = make_batch(ids, self.pad, self.skip).to(model_device(model))
        else:
            dtype = next(hf_model(model).parameters()).dtype
            batch = make_packed_batch(ids, self.packed_prefix, self.skip, dtype).to(model_device(model))
        z = batch_latents(model, self.layer, batch, self.latents, self.pooling, self.early_exit)
        zb = self.z_base[idx].to(z.device, z.dtype)
        raw = self.reduce(z - zb)
        with torch.no_grad():
            drift = float((z - zb).norm() / zb.norm().clamp_min(1e-12))
        return self.lam * raw, {"cwac_safety_raw": float(raw.detach()), "latent_drift": drift}

    @torch.no_grad()
    def drift(self, model, id_lists, z_base: torch.Tensor, batch_size: int) -> dict[str, float]:
        """Relative drift ``‖z − z_base‖ / ‖z_base‖`` and the mean L_safety over a prompt set."""
        z = prompt_latents(model, self.layer, id_lists, {"z": self.latents}, self.pooling, batch_size=batch_size,
                           pad=self.pad, skip_tokens=self.skip)["z"]
        d = z - z_base
        return {"latent_drift": float(d.norm() / z_base.norm().clamp_min(1e-12)),
                "safety_loss_raw": float(self.reduce(d))}
