"""RepNoise: representation noising in the alignment stage (Rosati et al., arXiv 2405.14577; checked
against ``domenicrosati/representation-noising/representation_noising/loss.py`` ``rep_noise_loss``,
and its port ``git-disl/Booster/loss_func/repnoise_loss.py`` with ``script/alignment/repNoise.sh``).

Loss per micro-batch, ``L = retain + beta * noise - alpha * log(harmful_ce + 1)``:

  * ``retain``: the response cross-entropy on the loop's batch, the harmless side (the alignment
    recipe's harmful -> refusal and Alpaca rows), as the Booster port uses its alignment batch;
  * ``noise``: on a batch of harmful (prompt, harmful answer) rows, the mean over decoder layers of
    the Gaussian-RBF-mixture MMD (5 bandwidths, ratio 2, the bandwidth from the batch's mean squared
    distance) between each row's masked MLP output, flattened to one vector of T x d, and Gaussian
    noise of the same shape under the same mask: it pushes the harmful rows' representations
    towards noise;
  * ``harmful_ce``: on the same harmful rows, ``(CE(final logits) + sum_h CE(lm_head(norm(h)))) / H``
    over the H = L + 1 hidden states (the logit lens; the reference divides the L + 2 terms by
    L + 1, and applies the final norm to the last hidden state again, and so does this); the
    ``- alpha * log(. + 1)`` term is its damped gradient ascent.
The mask is the harmful answer's positions (labels != -100): the reference masks the positions where
a harmful row and its paired refusal differ, which for a shared prompt is the answer.

Passes: two forwards (the harmful one with every hidden state and the MLP outputs) and one backward.
The logit-lens terms are recomputed in the backward (activation checkpointing), which saves the
(rows x tokens x vocabulary) logits of every layer and changes no value.

Cost: the logit lens applies the LM head to all L + 1 hidden states, forward, recomputed and
backward, so a step costs ~4 (L + 1) LM-head products on top of two forwards and a backward. On the
organism (30 layers, vocabulary 49152) the head dominates: 24.9 s a step against the organism's
alignment step of 2.8 s, 8.8x (benchmarks/cwac_overhead.py ``align_repnoise``,
results/benchmarks/align_defences).

Departures from the reference:
  * the retain term is the project's response loss on the alignment batch, not the masked CE on a
    paired refusal batch (the original) nor on the whole alignment sequence (the Booster port, whose
    unpaired mask covers almost every token, docs/baselines.md);
  * cross-entropies use the project's reduction (``training.loss_reduction``, a mean per sequence by
    default; the reference averages over tokens), keep the first answer token's prediction (the
    reference zeroes the logits there, a constant log V term) and do not drop token id 0 (the
    reference's pad assumption);
  * the noise is drawn from a seeded generator (reproducible); the MMD distances are computed as
    ||x||^2 + ||y||^2 - 2 x.y (the reference expands a (2B, 2B, T d) tensor); hooks are removed
    after every pass (the original never removes them);
  * the alignment recipe is the organism's, so the defence is the only change (the ports: LoRA,
    lr 5e-4 constant, batch 5, 20 epochs, 5000 pairs); harmful pairs: ``baselines._harmful``;
    ZeRO-3 is refused (untested).

Hyper-parameters (conf/method/repnoise.yaml):
  * ``alpha`` = 1, ``beta`` = 1e-3: ``rep_noise_loss`` defaults and the released
    ``repnoise_0.001_beta`` defence (the Booster / Antidote / Panacea ports use alpha = 0.1);
  * ``kernel_mul`` = 2, ``kernel_num`` = 5: ``MMD_loss`` defaults;
  * ``harmful_batch_size`` = null: the loop's micro-batch, as the paired original and the port;
  * ``n_harmful`` = null (every local pair; the ports use 5000); ``harmful_source`` = local and
    ``seed`` = 0: ours (offline data; noise and batch order).

Fine-tuning after it is plain SFT (``baselines._align_stage``):
    python run.py method=repnoise method@alignment.method=repnoise model.align=true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING
from torch.utils.checkpoint import checkpoint

from baselines._align_stage import AlignmentStageMethod
from baselines._harmful import HarmfulBatches, harmful_pairs
from cwac.api import LossOutput
from cwac.losses import target_ce
from cwac.modeling import decoder_layers, hf_model, model_device
from cwac.schema import ConfigError


@dataclass
class RepNoiseConfig:
    name: str = MISSING
    alpha: float = MISSING
    beta: float = MISSING
    kernel_mul: float = MISSING
    kernel_num: int = MISSING
    harmful_batch_size: Optional[int] = MISSING
    harmful_source: str = MISSING
    n_harmful: Optional[int] = MISSING
    seed: int = MISSING


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Gaussian-RBF-mixture MMD between the rows of ``x`` and ``y`` (both (n, D)); the base bandwidth
    is the mean squared distance over distinct pairs (not differentiated), divided by
    ``kernel_mul ** (kernel_num // 2)``."""
    n = x.shape[0]
    z = torch.cat([x, y]).float()
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    m = z.shape[0]
    bandwidth = d2.detach().sum() / max(m * m - m, 1) / kernel_mul ** (kernel_num // 2)
    bandwidth = bandwidth.clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


class RepNoise(AlignmentStageMethod):
    step_state = ("harmful", "gen")   # the harmful batch stream and the noise generator (cwac.resume)
    name = "repnoise"
    schema = RepNoiseConfig
    zero3_reason = ("it has not been tested there (its logit lens calls the LM head and the final norm "
                    "outside the model's forward)")

    @classmethod
    def check_values(cls, node, key: str) -> None:
        for name in ("alpha", "beta"):
            if node[name] < 0:
                raise ConfigError(f"config {key}.{name}={node[name]!r} is not valid: RepNoise needs {key}.{name} >= 0 "
                                  f"(conf/method/repnoise.yaml: alpha=1, beta=0.001)")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)
        self.batch_size = int(cfg.harmful_batch_size or ctx.training.micro_batch_size)
        self.last: dict = {}   # the latest micro-batch's harmful batch, mask, MLP outputs, noise (inspection, tests)

    def prepare(self, model) -> None:
        if not self.aligning:
            return
        self.harmful = HarmfulBatches(harmful_pairs(self.cfg.harmful_source, self.cfg.n_harmful), self.ctx.formatter,
                                      self.ctx.tokenizer, self.ctx.training.max_len, int(self.cfg.seed))
        self.gen = torch.Generator(device=model_device(model)).manual_seed(int(self.cfg.seed))

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen, device=like.device, dtype=like.dtype)

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if not self.aligning:
            return super().compute_loss(model, batch, step)
        if not hasattr(self, "harmful"):
            self.prepare(model)
        hb = self.harmful.next(self.batch_size, packed=False, device=model_device(model))   # padded: one row each
        labels = hb["labels"]
        mask = labels != -100                                  # the harmful answer's positions
        mlps = [layer.mlp for layer in decoder_layers(model)]
        acts: list[torch.Tensor | None] = [None] * len(mlps)

        def grab(i):
            def hook(module, args, output):
                acts[i] = output
            return hook

        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)   # positions whose next token is an answer token
        handles = [m.register_forward_hook(grab(i)) for i, m in enumerate(mlps)]
        try:   # forward 1: the harmful rows, with every hidden state and every MLP output
            out = model(input_ids=hb["input_ids"], attention_mask=hb["attention_mask"], output_hidden_states=True,
                        logits_to_keep=keep)
        finally:
            for h in handles:
                h.remove()

        m3 = mask.unsqueeze(-1)
        noises, terms = [], []
        for a in acts:
            hid = a * m3
            noise = self.noise(hid) * m3
            noises.append(noise.detach())
            terms.append(mmd(hid.flatten(1), noise.flatten(1), float(self.cfg.kernel_mul), int(self.cfg.kernel_num)))
        noise_loss = torch.stack(terms).mean()

        targets = labels[:, keep + 1]
        red = self.loss_reduction
        ce_final = target_ce(out.logits, targets, red)
        hf = hf_model(model)
        head, norm = hf.get_output_embeddings(), hf.get_decoder().norm

        def lens(h):
            return target_ce(head(norm(h[:, keep])), targets, red)

        lens_ces = [checkpoint(lens, h, use_reentrant=False) for h in out.hidden_states]
        harmful_ce = (ce_final + sum(lens_ces)) / len(out.hidden_states)
        ascent = -self.alpha * torch.log(harmful_ce + 1)
        del out

        retain = self.task_loss(model, batch)                   # forward 2: the harmless (alignment) rows
        self.last = {"harmful_ids": list(self.harmful.last_ids), "mask": mask, "noise": noises,
                     "mlp_outputs": [a.detach() for a in acts]}
        metrics = {"repnoise_mmd": float(noise_loss.detach()), "repnoise_harmful_ce": float(harmful_ce.detach()),
                   "repnoise_harmful_ce_final": float(ce_final.detach())}
        return LossOutput({"task": retain, "noise": self.beta * noise_loss, "ascent": ascent}, metrics)

    def align_info(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "kernel_mul": float(self.cfg.kernel_mul),
                "kernel_num": int(self.cfg.kernel_num), "harmful_batch_size": self.batch_size,
                "harmful_source": self.cfg.harmful_source,
                "n_harmful_pairs": len(self.harmful.features) if hasattr(self, "harmful") else None,
                "note": "loss = retain CE + beta * MMD(harmful MLP outputs, noise) - alpha * log(harmful CE + 1)"}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """RepNoise's own tensors in the alignment stage (docs/scale.md): the harmful forward's graph,
        kept until the loop's backward beside the retain batch's (the plan's activations count the
        latter), its masked MLP outputs and their noise (2 x layers x tokens x d_model), its hidden
        states for the logit lens, and one recomputed lens logit tensor (tokens x vocabulary, fp32)."""
        from cwac.memory import activation_components, key

        s, b = spec.shapes, spec.dtype_bytes
        n = int(cfg.harmful_batch_size or spec.micro_batch) * spec.seq_len
        act = sum(c.bytes for c in activation_components(spec, tokens=n))
        return {key("alignment stage: harmful forward's activations"): act,
                key("alignment stage: masked MLP outputs and noise"): 2 * s.n_layers * n * s.d_model * b,
                key("alignment stage: hidden states for the logit lens"): (s.n_layers + 1) * n * s.d_model * b,
                key("alignment stage: one logit-lens CE recomputed in the backward"): n * s.vocab * (b + 8)}
