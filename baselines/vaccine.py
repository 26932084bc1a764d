"""Vaccine: perturbation-aware alignment (Huang et al., arXiv 2402.01109; ``git-disl/Vaccine/trainer.py``).

An alignment-stage defence: SAM in activation space. Per micro-batch, inside ``compute_loss``:

  1. pass 1 on the alignment batch: ``G_l = d f / d e_l`` for every decoder layer's attention
     output ``e_l`` (element 0 of the attention module's output, before the residual add), taken
     with ``torch.autograd.grad`` so no parameter gradient is touched;
  2. ``eps_l = rho * G_l / (||G|| + 1e-7)``, one norm over all layers, tokens and the batch;
  3. pass 2 with ``e_l + eps_l`` injected by forward hooks (eps is a constant) -> the loss the
     loop back-propagates.

Because pass 1 never writes ``.grad``, no ``zero_grad`` is needed between the passes and
gradient accumulation keeps every micro-batch (the reference zeroes the gradients between its
passes and so drops all but the last micro-batch when accumulating). The perturbation is per
micro-batch, like the reference; with ``norm: example`` each sequence gets its own norm (so
``||eps[b]|| = rho`` per example), which makes accumulation *exactly* equal to a larger batch.
With the default ``norm: batch`` (the reference) eps depends on which rows share a micro-batch.

Stages: in ``align`` it is the method above; run as the fine-tuning method it is plain SFT and
only checks that the alignment stage used Vaccine, so cells are named after the defence:
    python run.py method=vaccine method@alignment.method=vaccine
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from cwac.modeling import decoder_layers, unwrap_engine
from cwac.api import LossOutput, Method
from cwac.schema import ConfigError


class Vaccine(Method):
    step_state = ()   # each step perturbs from its own gradients; nothing carries over (cwac.resume)
    stages = ("align", "finetune")

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """Fine-tuning: the start model is our Vaccine-aligned artifact. Alignment: ``norm`` is valid."""
        if stage == "finetune":
            if not cfg.model.align or cfg.alignment.method.name != "vaccine":
                raise ConfigError(f"config method=vaccine with method@alignment.method={cfg.alignment.method.name} "
                                  f"model.align={str(bool(cfg.model.align)).lower()}: Vaccine acts in the alignment "
                                  "stage; fine-tuning is plain SFT on a Vaccine-aligned model. Run `python run.py "
                                  "method=vaccine method@alignment.method=vaccine model.align=true` (our alignment stage)")
        elif node.norm not in ("batch", "example"):
            raise ConfigError(f"config {key}.norm={node.norm!r} is not valid; valid values: batch, example")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.rho = float(cfg.rho)
        self.last_eps: list[torch.Tensor] = []  # the perturbation of the latest micro-batch (inspection, tests)

    def packing_unsupported(self) -> str | None:
        if self.ctx.stage == "align" and self.cfg.norm == "example":
            return ("Vaccine's per-example perturbation norm (method.norm=example) needs one example per batch "
                    "row; packed batches hold several in one row")
        return None

    def perturbation(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """eps_l = rho * G_l / (||G|| + 1e-7), the norm over layers, tokens and batch (or per example)."""
        if self.cfg.norm == "batch":
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            return [(self.rho * g / (norm + 1e-7)).detach() for g in grads]
        per_ex = torch.sqrt(sum((g.float() ** 2).flatten(1).sum(1) for g in grads))  # (B,)
        scale = (self.rho / (per_ex + 1e-7)).view(-1, *([1] * (grads[0].dim() - 1)))
        return [(g * scale).detach() for g in grads]

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if self.ctx.stage != "align":
            return super().compute_loss(model, batch, step)
        attn = [layer.self_attn for layer in decoder_layers(model)]
        captured: list[torch.Tensor | None] = [None] * len(attn)

        def capture(i):
            def hook(module, args, output):
                captured[i] = output[0]
            return hook

        handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(attn)]
        try:  # pass 1: gradients w.r.t. the attention outputs only. Run on the bare module: the
            # engine's forward arms DeepSpeed's backward hooks, which refuse a direct autograd call
            # (ZeRO-3 would need its parameters gathered here; stages 0-2 are supported).
            loss1 = self.task_loss(unwrap_engine(model), batch)
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(loss1, captured, allow_unused=True)
        grads = [torch.zeros_like(c) if g is None else g for g, c in zip(grads, captured)]
        eps = self.perturbation(grads)
        loss1_value = float(loss1.detach())
        captured.clear()  # the pass-1 graph was freed by autograd.grad
        del grads, loss1

        def perturb(i):
            def hook(module, args, output):
                return (output[0] + eps[i].to(output[0].dtype), *output[1:])
            return hook

        handles = [m.register_forward_hook(perturb(i)) for i, m in enumerate(attn)]
        try:  # pass 2: the loss at the perturbed activations
            loss2 = self.task_loss(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.last_eps = eps
        eps_norm = float(torch.sqrt(sum((e.float() ** 2).sum() for e in eps)))
        return LossOutput({"task": loss2}, {"vaccine_loss_unperturbed": loss1_value,
                                            "vaccine_eps_norm": eps_norm})

    def record_info(self) -> dict:
        if self.ctx.stage == "finetune":  # what acted is the alignment stage's node, not this one
            node = OmegaConf.to_container(self.ctx.alignment.method, resolve=True)
            return {"stage": "finetune", "note": "fine-tuning is plain SFT", "alignment_method": node}
        return {"stage": "align", "rho": self.rho, "norm": self.cfg.norm, "note": "two passes per micro-batch"}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """Vaccine's own tensors in the alignment stage it runs in (docs/scale.md): the gradients G_l
        of pass 1 and the perturbations eps_l of every layer's attention output, each
        (micro-batch x tokens x d_model) in the model dtype. The fine-tuning stage is plain SFT."""
        from cwac.memory import key

        s = spec.shapes
        buf = s.n_layers * spec.tokens * s.d_model * spec.dtype_bytes
        return {key("alignment stage: pass-1 gradients G_l and perturbations eps_l"): 2 * buf}
