"""LDIFS: l2 distance in feature space to the aligned model (Mukhoti et al., "Fine-tuning can cripple
your foundation model; preserving features may be the solution", arXiv 2308.13320), as the
harmful-fine-tuning literature ports it to LLMs: ``LDIFSTrainer.training_step`` in
``git-disl/Antidote/trainer.py`` (checked at commit 26e2ade; the same trainer is in
``git-disl/Booster/trainer.py``), run by ``script/finetune/LDIFS_poison_ratio.sh``.

Per micro-batch, with ``m_l`` the output of decoder layer l's MLP block (before the residual add):

    loss = task + sum_l [rho/2 * D_l < skip_above] * rho/2 * D_l,   D_l = sum_t ||m_l(x_t; w) - m_l(x_t; w0)||^2

where ``w0`` are the weights fine-tuning starts from (the aligned model), ``t`` runs over the
micro-batch's real tokens (prompt and response), and the features of ``w0`` are computed on the
same batch under ``torch.no_grad`` (a constant: only the fine-tuned model's features carry a
gradient). The task loss and the features come from one forward pass (forward hooks on the MLP
blocks); the reference features cost one more forward, without backward. This is the
activation-only family CWAC argues against (docs/baselines.md, "LDIFS"), acting on every layer's
MLP output rather than on a few safety latents.

Where the aligned features come from (``reference``):
  * ``copy``: a frozen copy of the model taken in ``prepare`` (the reference: ``copy.deepcopy``),
    in ``reference_dtype`` (null: the model's dtype; ``bfloat16`` halves its memory). It doubles
    parameter memory at the model's dtype; under ZeRO-3 every rank holds the whole copy.
  * ``adapter_off`` (LoRA only): the same model with its adapter disabled (peft's
    ``disable_adapter``). Under LoRA the base weights are frozen, so this *is* the aligned model as
    long as the adapter starts at zero (peft's default, B = 0; checked in ``prepare``), at no extra
    memory.
  * ``auto``: ``adapter_off`` under LoRA, ``copy`` under full fine-tuning.

Hyper-parameters (``conf/method/ldifs.yaml``):
  * ``rho = 1e-4``: ``RHO=0.0001`` in ``LDIFS_poison_ratio.sh`` (reference).
  * ``skip_above = 0.1``: a layer term ``rho/2 * D_l >= 0.1`` is left out of the loss (the
    reference's ``if proximal_loss < 0.1``, commented there as dropping overflowing terms); null
    keeps every layer (ours).
  * layers: every decoder layer's MLP block (the reference hooks ``layers.{i}.mlp`` for every i).
  * the reference's optimiser settings (lr 1e-4, LoRA, 20 epochs, batch 5, wd 0.1) belong to the
    training node, not to this method; the cell's training node is used unchanged.

Departures from the reference:
  * the sum runs over real tokens only: padded positions are masked (the reference sums over every
    position of the padded batch, pads included, so its penalty depends on the padding). Packed
    batches (``training.packing``) have no padding and give the same per-token features, so the
    penalty is the same on packed and padded batches.
  * the frozen features are computed under ``no_grad`` and the frozen copy is in eval mode (the
    reference runs its copy with autograd on; that changes no gradient of the trained model, only
    memory).
  * gradient clipping is the training node's (``training.max_grad_norm``, once per optimizer step);
    the reference additionally clips at norm 5 after every micro-batch's backward.
  * the original LDIFS (image encoders) averages per-layer distances normalised by the feature size;
    the LLM port above, which the harmful-fine-tuning papers compare against, sums them. We follow
    the port.
  * under gradient accumulation the engine divides the micro-batch loss, penalty included, by the
    accumulation steps (the reference's scripts use no accumulation).
  * sequences are cut at the cell's ``training.max_len`` (512 at paper scale, 256 on the CPU preset);
    the reference forces ``model_max_length=256`` for LDIFS (180 for Gemma) "to prevent oom"
    (``train.py``), which a paper-scale run reproduces with ``training.max_len=256``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from omegaconf import MISSING

from cwac.api import LossOutput, Method
from cwac.losses import model_inputs
from cwac.modeling import decoder_layers, hf_model, is_lora, lora_factors, unwrap_engine
from cwac.schema import ConfigError

REFERENCES = ("auto", "copy", "adapter_off")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


Reference = Enum("Reference", {r: r for r in REFERENCES})
ReferenceDtype = Enum("ReferenceDtype", {d: d for d in DTYPES})


@dataclass
class LDIFSConfig:
    """``conf/method/ldifs.yaml`` (every key documented there); the enumerations are checked before
    any model loads."""

    name: str = MISSING
    rho: float = MISSING
    skip_above: Optional[float] = MISSING
    reference: Reference = MISSING
    reference_dtype: Optional[ReferenceDtype] = MISSING


@contextmanager
def capture_outputs(modules: list[torch.nn.Module], out: list):
    """Within the block, ``out[i]`` is the latest output of ``modules[i]`` (forward hooks)."""
    out[:] = [None] * len(modules)

    def hook(i):
        def fn(module, args, output):
            out[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def token_mask(batch: dict) -> torch.Tensor | None:
    """1 at real tokens of a padded batch; None for a packed batch (every position is a token)."""
    return batch.get("attention_mask")


def feature_distances(feats: list[torch.Tensor], ref: list[torch.Tensor],
                      mask: torch.Tensor | None) -> list[torch.Tensor]:
    """``D_l = sum over real tokens of ||feats_l - ref_l||^2`` (float32), one per layer."""
    out = []
    for a, b in zip(feats, ref):
        sq = ((a.float() - b.to(a.device).float()) ** 2).sum(-1)   # (B, T)
        if mask is not None:
            sq = sq * mask.to(sq.dtype)
        out.append(sq.sum())
    return out


def _mode(reference: str, lora: bool) -> str:
    """Where the aligned features come from: ``reference``, with ``auto`` resolved."""
    return ("adapter_off" if lora else "copy") if reference == "auto" else str(reference)


class LDIFS(Method):
    stages = ("finetune",)
    schema = LDIFSConfig

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """``rho`` >= 0, and a reference that fits the training setup (the schema checks the enumerations)."""
        if node.rho < 0:
            raise ConfigError(f"config {key}.rho={node.rho!r} is not valid: it must be >= 0 (reference: 1e-4)")
        lora = bool(cfg.training.lora.enabled)
        if _mode(node.reference, lora) == "adapter_off":
            if not lora:
                raise ConfigError(f"config {key}.reference=adapter_off needs LoRA (training=lora): under full "
                                  f"fine-tuning the model itself moves, so use {key}.reference=copy (or auto)")
            if node.reference_dtype is not None:
                raise ConfigError(f"config {key}.reference_dtype={node.reference_dtype} applies to the frozen copy "
                                  f"({key}.reference=copy) only; set {key}.reference_dtype=null with "
                                  f"{key}.reference={node.reference} under LoRA")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.rho = float(cfg.rho)
        self.skip_above = None if cfg.skip_above is None else float(cfg.skip_above)
        self.mode = _mode(cfg.reference, bool(ctx.training.lora.enabled))
        self.frozen: torch.nn.Module | None = None
        self.calls = 0
        self.skipped = 0   # layer terms left out (>= skip_above), over all micro-batches

    def prepare(self, model) -> None:
        if self.mode == "copy":
            src = hf_model(model)
            frozen = copy.deepcopy(src)
            if self.cfg.reference_dtype is not None:
                frozen = frozen.to(DTYPES[self.cfg.reference_dtype])
            frozen.eval()
            frozen.requires_grad_(False)
            self.frozen = frozen
        else:
            peft = unwrap_engine(model)
            if not hasattr(peft, "disable_adapter"):
                raise ValueError("method.reference=adapter_off needs a peft-wrapped model (training=lora)")
            nonzero = [n for n, m in peft.named_modules()
                       if is_lora(m) and float(lora_factors(m)[0].detach().abs().max()) != 0.0]
            if nonzero:
                raise ValueError(f"method.reference=adapter_off reads the aligned features from the model with its "
                                 f"adapter disabled, which equals the start model only while the adapter starts at "
                                 f"zero; lora_B of {nonzero[:2]} is not zero. Use method.reference=copy")
        self.n_layers = len(decoder_layers(model))

    # ---- features -------------------------------------------------------------------------
    @torch.no_grad()
    def reference_features(self, model, batch: dict) -> list[torch.Tensor]:
        """MLP outputs of the aligned weights on ``batch`` (no graph)."""
        if self.mode == "copy":
            net, ctx = self.frozen, nullcontext()
        else:
            net = unwrap_engine(model)
            ctx = net.disable_adapter()
        feats: list = []
        dev = next(net.parameters()).device
        inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        inputs.update(use_cache=False, logits_to_keep=1)   # the LM head's output is not needed
        with ctx, capture_outputs([layer.mlp for layer in decoder_layers(net)], feats):
            net(**inputs)
        return list(feats)

    def penalty(self, feats: list[torch.Tensor], ref: list[torch.Tensor], mask) -> tuple[torch.Tensor, dict]:
        """``sum_l rho/2 D_l`` over the layers whose term is below ``skip_above``, and metrics."""
        dists = feature_distances(feats, ref, mask)
        terms = [self.rho / 2 * d for d in dists]
        kept = [t for t in terms if self.skip_above is None or float(t.detach()) < self.skip_above]
        skipped = len(terms) - len(kept)
        total = torch.stack(kept).sum() if kept else feats[0].new_zeros((), dtype=torch.float32)
        return total, {"ldifs_distance": float(sum(float(d.detach()) for d in dists)),
                       "ldifs_layers_skipped": float(skipped)}

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        ref = self.reference_features(model, batch)
        feats: list = []
        with capture_outputs([layer.mlp for layer in decoder_layers(model)], feats):
            task = self.task_loss(model, batch)
        pen, metrics = self.penalty(list(feats), ref, token_mask(batch))
        self.calls += 1
        self.skipped += int(metrics["ldifs_layers_skipped"])
        return LossOutput({"task": task, "ldifs": pen}, metrics)

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """LDIFS's own tensors (docs/scale.md): the frozen copy (``copy``: every parameter in
        ``reference_dtype`` or the model dtype, the whole copy on every rank, also under ZeRO-3; none
        with ``adapter_off``), and per micro-batch the aligned MLP outputs of every layer plus the
        float32 differences autograd keeps for the penalty's backward (layers x tokens x d_model)."""
        from cwac.memory import key

        s = spec.shapes
        mode = _mode(cfg.reference, spec.lora)
        ref_bytes = DTYPES[cfg.reference_dtype].itemsize if cfg.reference_dtype is not None else spec.dtype_bytes
        feats = s.n_layers * spec.tokens * s.d_model
        out = {key("aligned MLP outputs (reference dtype)"): feats * ref_bytes,
               key("penalty: fp32 feature differences kept for backward"): feats * 4}
        if mode == "copy":
            out[key("frozen copy of the aligned model (not partitioned)")] = s.n_params * ref_bytes
        return out

    def record_info(self) -> dict:
        return {"rho": self.rho, "skip_above": self.skip_above, "reference": self.mode,
                "reference_dtype": self.cfg.reference_dtype, "features": "mlp output, every decoder layer",
                "n_layers": getattr(self, "n_layers", None), "micro_batches": self.calls,
                "layer_terms_skipped": self.skipped}
