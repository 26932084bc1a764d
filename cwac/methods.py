"""The ``Method`` interface: every defence is one subclass plus one ``conf/method/*.yaml``.

The training loop (``cwac.trainer``) owns DeepSpeed, batching, gradient accumulation,
logging and evaluation; a method only overrides the narrow hooks it needs. The hooks
mirror what the baselines actually change (style.md, "one training loop, narrow hooks"):

=========================  ====================================================  ==================
hook                       when                                                  used by
=========================  ====================================================  ==================
``prepare``                once, before training: build/load offline artifacts   CWAC, AsFT, SafeLoRA
``build_train_data``       once: edit the fine-tuning rows                       SafeInstr
``configure_model``        once, before the DeepSpeed engine is built            SPPFT (freezing)
``grad_hooks``             per-parameter gradient transforms (tensor hooks, so   CWAC (grad mode)
                           they act before ZeRO reduction/partitioning)
``replace_batch``          each micro-batch                                      Lisa
``compute_loss``           each micro-batch: named loss terms                    every regulariser
``after_step``             after each optimizer step                             CWAC (update mode), Lisa
``post_train``             once, after training                                  SafeLoRA
``record_info``            what to store in the result record                    all
=========================  ====================================================  ==================

Loss terms are returned by name in ``LossOutput.losses`` (already weighted); their sum is
the loss that is back-propagated, and each is logged as ``losses/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig

from cwac.registry import Registry

if TYPE_CHECKING:
    from cwac.data.examples import Example
    from cwac.data.prompts import PromptFormatter


@dataclass
class LossOutput:
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


@dataclass
class TrainContext:
    """What the loop hands to a method: configs, tokenizer, artifact store, reference models."""

    cfg: DictConfig                 # the whole resolved config
    tokenizer: Any
    formatter: "PromptFormatter"
    store: Any                      # cwac.artifacts.ArtifactStore
    run_dir: Any
    stage: str                      # "align" or "finetune"
    start_model_path: str           # weights training starts from (the aligned model when fine-tuning)
    base_model_path: str | None = None  # pre-alignment weights (AsFT / SafeLoRA reference), if known
    extra: dict = field(default_factory=dict)


def sequence_mean_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sequence") -> torch.Tensor:
    """Causal-LM cross-entropy on response tokens (labels != -100), from full-sequence logits.

    ``sequence``: mean over examples of each example's mean token loss. With batch size 1
    (the paper's setting) this is the usual loss, and it makes gradient accumulation exactly
    equivalent to a larger batch of the same number of examples. ``token``: HF's mean over all
    response tokens of the batch.
    """
    return target_ce(logits[:, :-1], labels[:, 1:], reduction)


def target_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sequence") -> torch.Tensor:
    """``sequence_mean_ce`` on logits already aligned with their targets (-100 = no target)."""
    logits = logits.float()
    mask = targets != -100
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets) * mask
    if reduction == "token":
        return tok_loss.sum() / mask.sum().clamp_min(1)
    if reduction == "sequence":
        per_seq = tok_loss.sum(1) / mask.sum(1).clamp_min(1)
        has = (mask.sum(1) > 0).float()
        return (per_seq * has).sum() / has.sum().clamp_min(1)
    raise ValueError(f"training.loss_reduction must be 'sequence' or 'token', got {reduction!r}")


def response_loss(model, batch: dict, reduction: str = "sequence") -> torch.Tensor:
    """``sequence_mean_ce`` of ``model`` on ``batch``, with the LM head applied only where it is used.

    Position t's logits predict token t+1, so only positions whose next token is a response token
    in some row of the batch are kept (``logits_to_keep``, a position index shared by the rows;
    other rows' targets there are -100). The loss is the same; the (vocabulary x hidden) head and
    its backward skip the prompt positions, which on short-answer tasks are nearly all of them.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return target_ce(out.logits, labels[:, keep + 1], reduction)


class Method:
    """Base class = plain supervised fine-tuning; subclasses override hooks.

    Args:
        cfg: the ``method`` config node.
        ctx: the training context.
    """

    #: stages this method may run in ("finetune", "align")
    stages: tuple[str, ...] = ("finetune", "align")

    def __init__(self, cfg: DictConfig, ctx: TrainContext):
        self.cfg = cfg
        self.ctx = ctx
        self.loss_reduction = ctx.cfg.training.get("loss_reduction", "sequence")

    def prepare(self, model: torch.nn.Module) -> None:
        """Build or load offline artifacts (via ``self.ctx.store``)."""

    def build_train_data(self, rows: list["Example"]) -> list["Example"]:
        return rows

    def configure_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def grad_hooks(self, model: torch.nn.Module) -> dict[torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]:
        return {}

    def replace_batch(self, batch: dict, step: int) -> dict:
        return batch

    def task_loss(self, model, batch: dict) -> torch.Tensor:
        return response_loss(model, batch, self.loss_reduction)

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        return LossOutput({"task": self.task_loss(model, batch)})

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}

    def post_train(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def record_info(self) -> dict:
        return {}


METHODS: Registry[Method] = Registry("method", Method)


def get_method(name: str) -> type[Method]:
    """Look a method up by name, after importing every module that registers methods."""
    import baselines  # noqa: F401  (registers the baselines)
    import cwac.method  # noqa: F401  (registers cwac, cwac_weight_only, cwac_act_only)

    return METHODS.get(name)
