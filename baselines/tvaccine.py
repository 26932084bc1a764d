"""T-Vaccine: targeted Vaccine on the safety-critical layers (Liu et al., arXiv 2410.09760; checked
against ``Lslland/T-Vaccine/trainer.py``, ``BaseTrainer.training_step``, and
``script/alignment/T-Vaccine.sh``).

Vaccine's perturbation-aware alignment (``baselines/vaccine.py``), restricted to a sampled set of
layers. Per optimizer step (at its first micro-batch):

  * every ``importance_every`` (K) steps, the layer importance on a harmful batch:
    ``p_l = ||dh/de_l|| / sum_k ||dh/de_k||``, with h the loss on harmful (prompt, harmful answer)
    pairs and e_l the attention output of decoder layer l (the reference's criterion: the norm of
    the gradient at each attention module's output, ``after_gradient_magnitude_step``);
  * every ``interval`` (J) steps, ``n_layers`` (S) layers sampled by p without replacement
    (``numpy`` ``choice``, as the reference, from a seeded generator).

Then, per micro-batch, Vaccine's two passes on the sampled layers only:
  1. ``G_l = df/de_l`` for the sampled layers (``torch.autograd.grad``: no ``.grad`` is written);
  2. ``eps_l = rho * G_l / (||G_S|| + 1e-7)``, the norm over the sampled layers, tokens and batch;
  3. pass 2 with ``e_l + eps_l`` on the sampled layers -> the loss the loop back-propagates.
The attention parameters of the other layers get no gradient (``grad_hooks`` zero it): the reference
freezes the attention LoRA of the layers not sampled (``unfreeze_activate_layers``; the MLP stays
trainable in every layer, and so it does here).

Departures from the reference:
  * the reference's patched model files take an ``activate_layers`` input (with i-1 added for each
    sampled i when a model has more than 26 layers). It only chooses which decoder layers run
    without gradient checkpointing: it changes memory, not the update, and is not ported;
  * the attention parameters of unsampled layers get a zero gradient instead of ``requires_grad=False``
    (which ZeRO's flat buffers do not allow to change between steps). Their AdamW moments still decay
    and move them a little after a switch (the reference's torch AdamW skips parameters without a
    gradient); weight decay still applies to them;
  * schedules count optimizer steps and every micro-batch of a step shares the sampled set; pass 1
    writes no ``.grad``, so gradient accumulation keeps every micro-batch (as in ``baselines/vaccine.py``);
  * under several ranks the layer norms are averaged over ranks so that every rank samples the same
    layers (the reference runs on one GPU);
  * the alignment recipe (rows, lr, epochs, full fine-tuning) is the organism's, so the defence is the
    only change (the reference: LoRA on a base model, lr 1e-3 cosine with 10% warm-up, 20 epochs,
    batch 10, max length 200, 2000 refusal pairs); harmful pairs: ``baselines._harmful`` (99 local
    pairs; the reference's 200 with ``harmful_source=hub n_harmful=200``); ZeRO-3 is refused.

Hyper-parameters (conf/method/tvaccine.yaml):
  * ``rho`` = 3: README (``bash T-Vaccine.sh 3``; argparse default 0.1);
  * ``n_layers`` (S) = 8, ``interval`` (J) = 20, ``importance_every`` (K) = 200: ``T-Vaccine.sh``;
  * ``importance_batch_size`` = 1: the reference's harmful loader (``get_dataloader``, batch 1);
  * ``n_harmful`` = null: every local pair (the reference's ``prompt_data_size`` = 200);
  * ``harmful_source`` = local and ``seed`` = 0: ours (offline data; the sampler and batch order).

Fine-tuning after it is plain SFT (``baselines._align_stage``):
    python run.py method=tvaccine method@alignment.method=tvaccine model.align=true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import MISSING

from baselines._align_stage import AlignmentStageMethod
from baselines._harmful import HarmfulBatches, harmful_pairs
from cwac.api import LossOutput
from cwac.modeling import decoder_layers, model_device, unwrap_engine
from cwac.schema import ConfigError


@dataclass
class TVaccineConfig:
    name: str = MISSING
    rho: float = MISSING
    n_layers: int = MISSING
    interval: int = MISSING
    importance_every: int = MISSING
    importance_batch_size: int = MISSING
    harmful_source: str = MISSING
    n_harmful: Optional[int] = MISSING
    seed: int = MISSING


class TVaccine(AlignmentStageMethod):
    #: the harmful batch stream, the layer sampler, its latest estimate and draw (cwac.resume)
    step_state = ("harmful", "rng", "probs", "active", "_step", "importance_log", "selection_log")
    name = "tvaccine"
    schema = TVaccineConfig
    zero3_reason = ("it has not been tested there (its pass 1 and importance pass run autograd on the bare "
                    "module, outside the engine)")

    @classmethod
    def check_values(cls, node, key: str) -> None:
        for name in ("n_layers", "interval", "importance_every", "importance_batch_size"):
            if int(node[name]) < 1:
                raise ConfigError(f"config {key}.{name}={node[name]!r} is not valid: it must be an integer >= 1 "
                                  f"(conf/method/tvaccine.yaml: n_layers=8, interval=20, importance_every=200, "
                                  f"importance_batch_size=1)")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.rho = float(cfg.rho)
        self.probs: np.ndarray | None = None   # the latest importance estimate p_l
        self.active: list[int] = []            # the sampled layers
        self._step = -1
        self.importance_log: list[dict] = []   # every estimate: step, p
        self.selection_log: list[dict] = []    # every sample: step, layers
        self.last_eps: dict[int, torch.Tensor] = {}   # layer -> perturbation of the latest micro-batch

    def prepare(self, model) -> None:
        if not self.aligning:
            return
        n = len(decoder_layers(model))
        if int(self.cfg.n_layers) > n:
            raise ValueError(f"method.n_layers={self.cfg.n_layers} but the model has {n} decoder layers; "
                             f"set method.n_layers <= {n}")
        self.harmful = HarmfulBatches(harmful_pairs(self.cfg.harmful_source, self.cfg.n_harmful), self.ctx.formatter,
                                      self.ctx.tokenizer, self.ctx.training.max_len, int(self.cfg.seed))
        self.rng = np.random.default_rng(int(self.cfg.seed))

    # ---- layer selection ------------------------------------------------------------------
    def importance(self, model) -> np.ndarray:
        """p_l = ||dh/de_l|| / sum_k ||dh/de_k|| on one harmful batch (attention outputs e_l)."""
        net = unwrap_engine(model)
        attn = [layer.self_attn for layer in decoder_layers(net)]
        hb = self.harmful.next(int(self.cfg.importance_batch_size), device=model_device(net))
        outs = _capture(attn, lambda: self.task_loss(net, hb))
        loss, captured = outs
        grads = torch.autograd.grad(loss, captured, allow_unused=True)
        norms = torch.stack([torch.zeros((), device=loss.device) if g is None else g.float().norm() for g in grads])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(norms)   # the same p on every rank, so every rank samples the same layers
        norms = norms.double().cpu().numpy()
        return norms / norms.sum()

    def select(self, probs: np.ndarray) -> list[int]:
        """S layers sampled by ``probs`` without replacement, sorted (the reference's ``switch_active_layers``)."""
        return sorted(int(i) for i in self.rng.choice(len(probs), int(self.cfg.n_layers), replace=False, p=probs))

    def _schedule(self, model, step: int) -> None:
        if step == self._step:
            return
        self._step = step
        if self.probs is None or step % int(self.cfg.importance_every) == 0:
            self.probs = self.importance(model)
            self.importance_log.append({"step": step, "p": [round(float(x), 4) for x in self.probs]})
        if not self.active or step % int(self.cfg.interval) == 0:
            self.active = self.select(self.probs)
            self.selection_log.append({"step": step, "layers": list(self.active)})

    def grad_hooks(self, model):
        """Zero the gradient of the attention parameters of every layer that is not sampled."""
        if not self.aligning:
            return {}

        def mask(i):
            def hook(g):
                return g if i in self.active else torch.zeros_like(g)
            return hook

        return {p: mask(i) for i, layer in enumerate(decoder_layers(model))
                for p in layer.self_attn.parameters() if p.requires_grad}

    # ---- the two passes ---------------------------------------------------------------------
    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if not self.aligning:
            return super().compute_loss(model, batch, step)
        if not hasattr(self, "harmful"):
            self.prepare(model)
        self._schedule(model, step)
        net = unwrap_engine(model)
        layers = decoder_layers(net)
        attn = [layers[i].self_attn for i in self.active]
        loss1, captured = _capture(attn, lambda: self.task_loss(net, batch))   # pass 1 (bare module: autograd.grad)
        grads = torch.autograd.grad(loss1, captured, allow_unused=True)
        grads = [torch.zeros_like(c) if g is None else g for g, c in zip(grads, captured)]
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
        eps = [(self.rho * g / (norm + 1e-7)).detach() for g in grads]
        loss1_value = float(loss1.detach())
        del grads, captured, loss1

        def perturb(e):
            def hook(module, args, output):
                return (output[0] + e.to(output[0].dtype), *output[1:])
            return hook

        handles = [m.register_forward_hook(perturb(e)) for m, e in zip(attn, eps)]
        try:  # pass 2: the loss at the perturbed attention outputs of the sampled layers
            loss2 = self.task_loss(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.last_eps = dict(zip(self.active, eps))
        eps_norm = float(torch.sqrt(sum((e.float() ** 2).sum() for e in eps)))
        return LossOutput({"task": loss2}, {"tvaccine_loss_unperturbed": loss1_value, "tvaccine_eps_norm": eps_norm})

    def align_info(self) -> dict:
        return {"rho": self.rho, "n_layers": int(self.cfg.n_layers), "interval": int(self.cfg.interval),
                "importance_every": int(self.cfg.importance_every), "harmful_source": self.cfg.harmful_source,
                "n_harmful_pairs": len(self.harmful.features) if hasattr(self, "harmful") else None,
                "importance": self.importance_log, "selections": self.selection_log,
                "note": "two passes per micro-batch on the sampled layers; one importance pass every K steps"}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """T-Vaccine's own tensors in the alignment stage (docs/scale.md): the pass-1 gradients G_l and
        the perturbations eps_l of the S sampled layers' attention outputs (micro-batch x tokens x d_model,
        model dtype); the importance pass's gradients at every layer for its harmful rows are smaller."""
        from cwac.memory import key

        s = spec.shapes
        buf = min(int(cfg.n_layers), s.n_layers) * spec.tokens * s.d_model * spec.dtype_bytes
        imp = s.n_layers * int(cfg.importance_batch_size) * spec.seq_len * s.d_model * spec.dtype_bytes
        return {key("alignment stage: G_l and eps_l of the sampled layers"): 2 * buf,
                key("alignment stage: importance pass, dh/de_l of every layer"): imp}


def _capture(modules, forward):
    """(forward(), [element 0 of each module's output in that forward])."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def grab(i):
        def hook(module, args, output):
            captured[i] = output[0]
        return hook

    handles = [m.register_forward_hook(grab(i)) for i, m in enumerate(modules)]
    try:
        out = forward()
    finally:
        for h in handles:
            h.remove()
    return out, captured
