"""Antidote: post-fine-tuning safety alignment by one-shot pruning of harmful weights (Huang et al.,
arXiv 2408.09600; reference code ``git-disl/Antidote``: ``prune_wanda_outlier`` and ``WrappedGPT`` in
``utils.py``, the mask applied at the end of ``train.py``; checked at commit 26e2ade).

After fine-tuning, no gradient step:

  1. run re-alignment data, harmful (prompt, harmful answer) pairs, through the fine-tuned model and
     record ``n_j = sum over tokens of x_j^2`` for every input column j of each targeted linear map
     (Wanda's activation statistic; prompt and answer tokens alike, padding masked);
  2. score every weight ``S_ij = |W_ij| * sqrt(n_j)``;
  3. in every output row i, set the highest-scoring weights to zero: all but the
     ``int(d_in * (1 - dense_ratio))`` lowest-scoring (the reference's count, a stable ascending sort),
     i.e. the top ``dense_ratio`` fraction, and at least one per row.

Nothing else changes: the other weights of the targeted maps and every other parameter keep their
fine-tuned values (tested).

What is pruned (``targets``, the reference's q, k, v):
  * LoRA (``training=lora``): the adapter's factors ``lora_A`` and ``lora_B`` of every targeted map
    that carries an adapter, each scored on its own input (``lora_B``'s is ``lora_A``'s output), as
    the reference's ``find_layers`` selects every ``lora`` linear. Maps without an adapter are frozen
    (still the aligned weights) and are left alone.
  * full fine-tuning: the fine-tuned weights W of the targeted maps, as the reference's
    ``--full_finetuning True`` path does (``antidote_poison_ratio_full.sh``).

Hyper-parameters (``conf/method/antidote.yaml``):
  * ``dense_ratio.lora = 0.1``: ``antidote_poison_ratio.sh`` (SST-2; the reference's GSM8K, AG News and
    cross-model scripts use 0.05).
  * ``dense_ratio.full = 1e-5``: ``antidote_poison_ratio_full.sh``. With ``int()`` this prunes exactly
    one weight per output row at any width below 10^5 (4096 columns: 4096 - int(4095.96) = 1).
  * re-alignment data (``harmful_source``, ``n_harmful``): the reference uses 2000 unsafe BeaverTails
    ``30k_train`` rows past the attack's range (``poison_data_start=5000``; its strict inequalities give
    1999). Here ``baselines._harmful.harmful_pairs``, the defence range shared with Booster and
    RepNoise: ``local`` = the 99 local pairs of rows 100-199 whose prompts are in no evaluation or
    validation set (the CPU mixes, n = 400, reach row 100 only at p > 0.25; at p = 0.5 they contain
    them: the record counts the overlap); ``hub`` = rows 5000-9999, the first ``n_harmful`` = 2000.
  * ``batch_size = 1``: the reference's calibration batch; padding is masked, so a larger batch gives
    the same statistic up to float rounding and only runs faster.

Departures from the reference:
  * the statistic comes from one ordinary forward pass per batch with hooks on the targeted maps; the
    reference runs the layers one at a time on cached inputs, but it applies no mask before all
    scores are taken, so every layer sees the unpruned model's activations either way.
  * the reference's LoRA setting is its own (r = 256, alpha 4, on q, k, v); ours is the cell's
    ``training.lora`` node (defaults r 8 on q, v; so k has no adapter and is not pruned).
  * the optional safety ("good") mask is off by default in the reference and not implemented here.
  * the re-alignment pairs are tokenised like training rows (the cell's prompt format, cut at
    ``training.max_len``); the reference uses its Alpaca template at ``model_max_length`` 2048.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from omegaconf import MISSING

from cwac.api import Method
from cwac.data.prompts import collate_train, pad_id
from cwac.modeling import LINEAR_TARGETS, base_linear, is_lora, linear_modules, model_device, unwrap_engine
from cwac.schema import ConfigError

log = logging.getLogger(__name__)


HarmfulSource = Enum("HarmfulSource", {"local": "local", "hub": "hub"})


@dataclass
class DenseRatio:
    lora: float = MISSING
    full: float = MISSING


@dataclass
class AntidoteConfig:
    """``conf/method/antidote.yaml`` (every key documented there); checked before any model loads."""

    name: str = MISSING
    dense_ratio: DenseRatio = MISSING
    targets: list[str] = MISSING
    harmful_source: HarmfulSource = MISSING
    n_harmful: Optional[int] = MISSING
    batch_size: int = MISSING


def n_kept(d_in: int, dense_ratio: float) -> int:
    """Weights per row that stay: the reference's ``int(d_in * (1 - dense_ratio))``."""
    return int(d_in * (1 - dense_ratio))


def prune_mask(W: torch.Tensor, sq_norms: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """True at the weights to zero: per row, all but the ``n_kept`` lowest of ``|W| * sqrt(sq_norms)``
    in a stable ascending sort (ties: the later column is pruned first)."""
    score = W.detach().abs().float() * sq_norms.float().sqrt().unsqueeze(0)
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, n_kept(W.shape[1], dense_ratio):], True)
    return mask


class Antidote(Method):
    stages = ("finetune",)
    schema = AntidoteConfig

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """The dense ratio the run uses (LoRA or full fine-tuning), the targets and the batch size."""
        which = "lora" if cfg.training.lora.enabled else "full"
        ratio = node.dense_ratio[which]
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"config {key}.dense_ratio.{which}={ratio} is not valid: it must be in (0, 1), the "
                              "fraction of each row's weights pruned (reference: 0.1 under LoRA, 1e-5 under full "
                              "fine-tuning)")
        targets = [str(t) for t in node.targets]
        if not targets or set(targets) - set(LINEAR_TARGETS):
            raise ConfigError(f"config {key}.targets={targets} is not valid: a non-empty list of "
                              f"{list(LINEAR_TARGETS)} (reference: [q_proj, k_proj, v_proj])")
        if node.batch_size < 1:
            raise ConfigError(f"config {key}.batch_size={node.batch_size} is not valid: it must be >= 1 (reference: 1)")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.lora = bool(ctx.training.lora.enabled)
        self.dense_ratio = float(cfg.dense_ratio.lora if self.lora else cfg.dense_ratio.full)
        self.targets = [str(t) for t in cfg.targets]
        self.info: dict = {}
        self.masks: dict[str, torch.Tensor] = {}   # name -> pruned positions (inspection, tests)

    # ---- re-alignment data ----------------------------------------------------------------
    def prepare(self, model) -> None:
        from baselines._harmful import harmful_pairs

        self.rows = harmful_pairs(str(self.cfg.harmful_source), self.cfg.n_harmful)
        self.features = [self.ctx.formatter.train_features(e, self.ctx.training.max_len) for e in self.rows]
        self.overlap = 0

    def build_train_data(self, rows):
        mine = {(e.instruction, e.output) for e in self.rows}
        self.overlap = sum((e.instruction, e.output) in mine for e in rows)
        if self.overlap:
            log.warning("Antidote: %d of its %d re-alignment pairs are also in the fine-tuning mix",
                        self.overlap, len(self.rows))
        return rows

    # ---- pruning --------------------------------------------------------------------------
    def prunable(self, model) -> dict[str, torch.nn.Linear]:
        """Name -> the linear layer whose weight is scored and pruned (see the module docstring)."""
        mods = linear_modules(model, self.targets)
        if not self.lora:
            return {n: base_linear(m) for n, m in mods.items()}
        out = {}
        for n, m in mods.items():
            if is_lora(m):
                (adapter,) = list(m.active_adapters)
                out[f"{n}.lora_A"] = m.lora_A[adapter]
                out[f"{n}.lora_B"] = m.lora_B[adapter]
        if not out:
            raise ValueError(f"Antidote under LoRA prunes the adapters of {self.targets}, but none of them carries one "
                             f"(training.lora.target_modules); set method.targets to adapted maps")
        return out

    @torch.no_grad()
    def input_sq_norms(self, model, layers: dict[str, torch.nn.Linear]) -> tuple[dict[str, torch.Tensor], int]:
        """``n_j`` per input column of every layer over the re-alignment data, and the token count."""
        net = unwrap_engine(model)
        dev = model_device(net)
        sums = {n: torch.zeros(lin.weight.shape[1], dtype=torch.float32, device=dev) for n, lin in layers.items()}
        state: dict = {}

        def hook(name):
            def fn(module, args):
                x = args[0].float() ** 2
                sums[name] += (x * state["mask"].unsqueeze(-1)).sum(dim=(0, 1))
            return fn

        handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in layers.items()]
        was_training, tokens, bs, pad = net.training, 0, int(self.cfg.batch_size), pad_id(self.ctx.tokenizer)
        net.eval()
        try:
            for i in range(0, len(self.features), bs):
                batch = collate_train(self.features[i: i + bs], pad)
                mask = batch["attention_mask"].to(dev)
                state["mask"] = mask.float()
                net(input_ids=batch["input_ids"].to(dev), attention_mask=mask, use_cache=False, logits_to_keep=1)
                tokens += int(mask.sum())
        finally:
            for h in handles:
                h.remove()
            net.train(was_training)
        return sums, tokens

    @torch.no_grad()
    def post_train(self, model):
        layers = self.prunable(model)
        sq, tokens = self.input_sq_norms(model, layers)
        pruned, total = {}, 0
        for n, lin in layers.items():
            mask = prune_mask(lin.weight, sq[n], self.dense_ratio)
            lin.weight.masked_fill_(mask, 0.0)
            self.masks[n] = mask
            pruned[n] = int(mask.sum())
            total += lin.weight.numel()
        n_pruned = sum(pruned.values())
        self.info = {"dense_ratio": self.dense_ratio, "pruned": "lora_A, lora_B" if self.lora else "W",
                     "targets": self.targets, "n_matrices": len(layers), "n_pruned": n_pruned,
                     "pruned_fraction": n_pruned / max(1, total), "pruned_per_matrix": pruned,
                     "harmful_source": str(self.cfg.harmful_source), "n_harmful": len(self.rows),
                     "calibration_tokens": tokens, "overlap_with_mix": self.overlap}
        log.info("Antidote pruned %d of %d weights in %d matrices on %d re-alignment pairs", n_pruned, total,
                 len(layers), len(self.rows))
        return model

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """Antidote's own tensors after training (docs/scale.md), with the full weights gathered: one
        float32 column statistic per targeted map, and for one map at a time its float32 scores, the
        int64 sort indices and the boolean mask (bounded by the largest full-size target; LoRA factors
        are smaller). The calibration forward runs under no_grad at ``batch_size`` rows."""
        from cwac.memory import key

        s = spec.shapes
        shapes = [s.linear(str(t)) for t in cfg.targets]
        stats = s.n_layers * sum(i for _, i in shapes) * 4 * (2 if spec.lora else 1)
        o, i = max(shapes, key=lambda oi: oi[0] * oi[1])
        return {key("column statistics ||X_j||^2 (fp32)", "post_train"): stats,
                key("one map's scores, sort indices and mask", "post_train"): o * i * (4 + 8 + 1)}

    def record_info(self) -> dict:
        return self.info
