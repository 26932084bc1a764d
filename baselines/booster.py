"""Booster: attenuating harmful perturbation in the alignment stage (Huang et al., arXiv 2409.01586;
checked against ``git-disl/Booster/trainer.py``, ``BoosterAlignmentTrainer.training_step``, and
``script/alignment/smooth_align.sh``).

Objective: ``min_w f(w) + lam * [h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)]``, with f the
alignment loss (the loop's batch: the alignment recipe's refusal and Alpaca rows) and h the loss on
harmful (prompt, harmful answer) pairs. Per micro-batch, inside ``compute_loss``, three passes:

  1. h(w) on a harmful batch and ``g = grad h(w)`` (``torch.autograd.grad``: no ``.grad`` is written);
  2. w' = w - alpha * g / (||g|| + 1e-7) in place, h(w') and ``g' = grad h(w')`` on the same batch,
     then w restored (``w' + alpha * g / ...``, as the reference does);
  3. f(w) on the alignment batch, which the loop back-propagates, together with the term
     ``attenuation = lam * (h(w) - h(w')) + lam * <g - g', w>_surrogate``: its value is
     lam * (h(w) - h(w')) and its gradient is exactly lam * (g - g') (the surrogate is
     ``sum(c * w) - sum(c * w).detach()`` with c = g - g' constant), so the optimizer steps with
     ``grad f + lam * (grad h(w) - grad h(w'))``, the reference's summed gradient. The Jacobian of
     the inner step is ignored, as in the reference.

Cost on the organism: 15.9 s a step against the organism's alignment step of 2.8 s, 5.6x (two
passes on 10 harmful rows beside one on 8 alignment rows; benchmarks/cwac_overhead.py
``align_booster``, results/benchmarks/align_defences).

Departures from the reference:
  * gradient accumulation keeps every micro-batch (the reference zeroes ``.grad`` between its passes,
    which drops all but the last micro-batch); each micro-batch draws its own harmful batch;
  * the norm and the perturbation run over the trainable parameters (full fine-tuning here, the
    LoRA adapter there; with ``training=lora`` it is the adapter, as in the reference);
  * the alignment recipe (rows, lr, epochs, full fine-tuning) is the organism's
    (``conf/alignment/organism.yaml``), so that the defence is the only change from the organism.
    The reference aligns a base model with LoRA, lr 5e-4 constant, 20 epochs, batch 10, wd 0.1
    (``smooth_align.sh``); that recipe is not ported;
  * harmful pairs: the project's BeaverTails pool (``baselines._harmful``: 99 local pairs, rows
    100-199 minus evaluation and validation prompts; ``harmful_source=hub`` reads rows 5000-9999,
    the reference's ``poison_data_start=5000`` with ``bad_sample_num=5000``);
  * ZeRO-3 is refused (the in-place weight perturbation needs whole parameters); under several ranks
    (ZeRO <= 2) each rank normalises the gradient of its own share of the harmful batch (passes 1-2
    are not all-reduced), where the single-GPU reference normalises the whole batch's.

Hyper-parameters (conf/method/booster.yaml):
  * ``lam`` = 5: ``smooth_align.sh`` (argparse default 1e-3; 25 for GSM8K per git-disl/Booster#3);
  * ``alpha`` = 0.1: ``smooth_align.sh``;
  * ``harmful_batch_size`` = 10: hard-coded in ``get_harmful_dataloader``;
  * ``harmful_chunk`` = null (ours): rows per harmful forward/backward; null runs the whole harmful
    batch in one pass, as the reference does. A number splits passes 1 and 2 into chunks whose
    losses and gradients are weighted to sum to the whole batch's (``HarmfulBatches.next_chunks``),
    so the objective and the normalisation are the reference's, at one chunk's activations and one
    more gradient buffer. ``budget=paper`` sets 1: ten rows of 512 tokens beside the micro-batch
    put the harmful passes' activations at ~66 GiB on Gemma-2-9B (docs/scale.md);
  * ``n_harmful`` = null (every local pair; the reference uses 5000, paper key below);
  * ``harmful_source`` = local (ours: offline); ``seed`` = 0 (ours: the harmful batches' order).
Paper scale (``conf/method_budget/booster/paper.yaml``): ``harmful_source=hub``, ``n_harmful=5000`` (needs
``offline=false``) and ``harmful_chunk=1``.

On the organism (full fine-tuning, lam=5, alpha=0.1) the attenuation term runs away below zero
(h(w') - h(w) ~ 125 nats by the end), and the artifact answers the BeaverTails prompts its defence
pairs come from: its HS is 43.5 before any fine-tuning, against the organism's 4.0 (docs/baselines.md,
Booster, "On the organism").

Fine-tuning after it is plain SFT (``baselines._align_stage``):
    python run.py method=booster method@alignment.method=booster model.align=true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING

from baselines._align_stage import AlignmentStageMethod
from baselines._harmful import HarmfulBatches, harmful_pairs
from cwac.api import LossOutput
from cwac.data.prompts import is_packed
from cwac.modeling import model_device, unwrap_engine
from cwac.schema import ConfigError


@dataclass
class BoosterConfig:
    name: str = MISSING
    lam: float = MISSING
    alpha: float = MISSING
    harmful_batch_size: int = MISSING
    harmful_chunk: Optional[int] = MISSING
    harmful_source: str = MISSING
    n_harmful: Optional[int] = MISSING
    seed: int = MISSING


class Booster(AlignmentStageMethod):
    step_state = ("harmful",)   # the harmful batch stream (cursor and RNG) (cwac.resume)
    name = "booster"
    schema = BoosterConfig
    zero3_reason = "it perturbs and restores whole parameters in place between its passes"

    @classmethod
    def check_values(cls, node, key: str) -> None:
        for name, ok, rule in (("lam", node.lam >= 0, ">= 0"), ("alpha", node.alpha > 0, "> 0"),
                               ("harmful_batch_size", node.harmful_batch_size >= 1, ">= 1"),
                               ("harmful_chunk", node.harmful_chunk is None or node.harmful_chunk >= 1,
                                "null (the whole harmful batch in one pass) or >= 1")):
            if not ok:
                raise ConfigError(f"config {key}.{name}={node[name]!r} is not valid: Booster needs {key}.{name} {rule} "
                                  f"(conf/method/booster.yaml: lam=5, alpha=0.1, harmful_batch_size=10, "
                                  f"harmful_chunk=null)")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.lam, self.alpha = float(cfg.lam), float(cfg.alpha)
        self.harmful: HarmfulBatches | None = None
        self.last: dict = {}   # the rows of the latest micro-batch's harmful batch (inspection, tests)

    def prepare(self, model) -> None:
        if not self.aligning:
            return
        rows = harmful_pairs(self.cfg.harmful_source, self.cfg.n_harmful)
        self.harmful = HarmfulBatches(rows, self.ctx.formatter, self.ctx.tokenizer, self.ctx.training.max_len,
                                      int(self.cfg.seed))

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if not self.aligning:
            return super().compute_loss(model, batch, step)
        if self.harmful is None:
            self.prepare(model)
        net = unwrap_engine(model)   # passes 1-2 call autograd directly, outside the engine's hooks
        params = [p for p in net.parameters() if p.requires_grad]
        size = int(self.cfg.harmful_batch_size)
        hb = self.harmful.next_chunks(size, int(self.cfg.harmful_chunk or size), self.loss_reduction,
                                      packed=is_packed(batch), device=model_device(net))

        h_w, g = self._harmful_loss_and_grads(net, params, hb)          # pass 1: h(w), grad h(w)
        norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g)) + 1e-7
        scale = self.alpha / norm
        with torch.no_grad():
            for p, x in zip(params, g):
                p.sub_((scale * x).to(p.dtype))                          # w' = w - alpha * g / ||g||
        try:
            h_w2, g2 = self._harmful_loss_and_grads(net, params, hb)    # pass 2: h(w'), grad h(w')
        finally:
            with torch.no_grad():
                for p, x in zip(params, g):
                    p.add_((scale * x).to(p.dtype))                      # restore w
        for a, b in zip(g, g2):
            a.sub_(b)                                                    # c = grad h(w) - grad h(w'), in place
        del g2

        f = self.task_loss(model, batch)                                # pass 3: f(w), back-propagated by the loop
        lin = sum((c * p).sum() for c, p in zip(g, params))
        attenuation = self.lam * (h_w.detach() - h_w2.detach()) + self.lam * (lin - lin.detach())
        self.last = {"harmful_ids": list(self.harmful.last_ids)}
        metrics = {"booster_harmful_loss": float(h_w.detach()), "booster_harmful_loss_perturbed": float(h_w2.detach()),
                   "booster_harmful_grad_norm": float(norm)}
        return LossOutput({"task": f, "attenuation": attenuation}, metrics)

    def _harmful_loss_and_grads(self, net, params, chunks) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h and grad h on the harmful batch, one chunk's forward and backward at a time (weighted so
        that the sums are the whole batch's loss and gradient; a single chunk is the batch itself)."""
        if len(chunks) == 1:
            h = self.task_loss(net, chunks[0][0])
            return h, _grads(h, params)
        h, acc = None, None
        for hb, weight in chunks:
            loss = self.task_loss(net, hb) * weight
            q = _grads(loss, params)
            if acc is None:
                acc = q
            else:
                for a, b in zip(acc, q):
                    a.add_(b)
            del q
            h = loss.detach() if h is None else h + loss.detach()
        return h, acc

    def align_info(self) -> dict:
        n = len(self.harmful.features) if self.harmful is not None else None
        return {"lam": self.lam, "alpha": self.alpha, "harmful_batch_size": int(self.cfg.harmful_batch_size),
                "harmful_chunk": self.cfg.harmful_chunk,
                "harmful_source": self.cfg.harmful_source, "n_harmful_pairs": n,
                "note": "three passes per micro-batch: h(w), h(w - alpha g/||g||), f(w)"}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """Booster's own tensors in the alignment stage (docs/scale.md): grad h(w) and grad h(w') of every
        trainable parameter in the model dtype, whole on every rank (ZeRO-3 is refused), one chunk's
        gradient beside them when the harmful batch runs in chunks, and the harmful passes' activations
        beyond the loop's micro-batch when a harmful pass holds more rows than it."""
        from cwac.memory import activation_components, key

        b = spec.dtype_bytes
        size = int(cfg.harmful_batch_size)
        rows = min(size, int(cfg.harmful_chunk or size))
        out = {key("alignment stage: grad h(w) and grad h(w') (model dtype)"): 2 * spec.trainable * b}
        if rows < size:
            out[key("alignment stage: one harmful chunk's gradient, summed into them")] = spec.trainable * b
        extra = rows - spec.micro_batch
        if extra > 0:
            act = sum(c.bytes for c in activation_components(spec, tokens=extra * spec.seq_len))
            out[key("alignment stage: harmful passes' activations beyond the micro-batch")] = act
        return out


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr.detach() for gr, p in zip(grads, params)]
