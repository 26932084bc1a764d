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
``packing_unsupported``    once: why packed batches would change the method      Vaccine (per-example norm)
``replace_batch``          each micro-batch                                      Lisa
``compute_loss``           each micro-batch: named loss terms                    every regulariser
``after_step``             after each optimizer step                             CWAC (update mode), Lisa
``post_train``             once, after training                                  SafeLoRA
``record_info``            what to store in the result record                    all
``planned_memory``         (classmethod, no model) the bytes of the method's     CWAC, AsFT, Lisa,
                           own tensors per rank, for ``python -m cwac.plan``     SafeLoRA, SPPFT,
                           (``cwac.memory``; docs/scale.md)                      Vaccine
``check_config``           (classmethod, no model) refuse a bad setting of the   Booster, T-Vaccine,
                           method's node in pre-flight, before any model loads   RepNoise, Vaccine,
                           (``cwac.experiment.preflight``): name the key, the    AsFT, Lisa, SafeLoRA,
                           value and the fix                                     LDIFS, Antidote, SafeInstr
=========================  ====================================================  ==================

Loss terms are returned by name in ``LossOutput.losses`` (already weighted); their sum is
the loss that is back-propagated, and each is logged as ``losses/<name>``.

The hooks run in one lifecycle, ``cwac.trainer.fit``: prepare -> build_train_data ->
configure_model -> train (grad_hooks, replace_batch, compute_loss, after_step) -> post_train.
``check_config`` runs before all of them, in pre-flight, before the model loads.
A new defence is one module with a ``Method`` subclass, one ``conf/method/<name>.yaml`` and one
line in ``cwac/experiment/plugins.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig

from cwac.losses import response_loss
from cwac.registry import Registry

if TYPE_CHECKING:
    from cwac.data.examples import Example
    from cwac.data.prompts import PromptFormatter
    from cwac.memory import PlanSpec


@dataclass
class LossOutput:
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


@dataclass
class TrainContext:
    """What the loop hands to a method besides its own config node: the training node it runs
    under, the tokenizer and prompt format, the artifact store, and the models it may compare
    against. A method never sees the whole experiment config.
    """

    training: DictConfig            # the ``training`` node this stage trains with
    tokenizer: Any
    formatter: "PromptFormatter"
    store: Any                      # cwac.artifacts.ArtifactStore
    run_dir: Any
    stage: str                      # "align" or "finetune"
    start_model_path: str           # weights training starts from (the aligned model when fine-tuning)
    base_model_path: str | None = None  # pre-alignment weights (AsFT / SafeLoRA reference), if known
    seed: int = 0                   # the cell's seed (the alignment recipe's seed in the alignment stage)
    task: str | None = None         # the fine-tuning task's name (``task.name``)
    model_name: str | None = None   # ``model.name`` (per-model presets such as SPPFT's bands)
    hub_ok: bool = False            # ``offline=false``: hub checkpoints may be downloaded
    alignment: DictConfig | None = None  # the alignment recipe (``alignment``): its rows, its method node
    aligned_by_us: bool = False     # ``model.align``: the start model is our alignment stage's artifact

    @classmethod
    def from_config(cls, cfg: DictConfig, stage: str = "finetune", **kw) -> "TrainContext":
        """The context of a cell of the experiment config ``cfg``: the nodes a method may read,
        taken from ``cfg``; ``kw`` gives the rest (tokenizer, formatter, store, run_dir,
        start_model_path, base_model_path)."""
        return cls(training=cfg.training, stage=stage, seed=int(cfg.seed), task=cfg.task.name,
                   model_name=cfg.model.name, hub_ok=not cfg.offline,
                   alignment=cfg.alignment, aligned_by_us=bool(cfg.model.align), **kw)


class Method:
    """Base class = plain supervised fine-tuning; subclasses override hooks.

    Args:
        cfg: the ``method`` config node.
        ctx: the training context.
    """

    #: stages this method may run in ("finetune", "align")
    stages: tuple[str, ...] = ("finetune", "align")
    #: a typed schema of the method's config node (``cwac.schema``), checked before any model loads
    schema: type | None = None
    #: the attributes that carry from one optimizer step to the next (batch cursors, RNG streams:
    #: ``random.Random``, NumPy or torch generators), saved in the loop's checkpoints and restored on
    #: resume (``cwac.resume``). Declared on each class itself, not inherited: a class that declares
    #: nothing trains without checkpoints. ``()``: the method keeps no such state.
    step_state: tuple[str, ...] | None = ()

    def __init__(self, cfg: DictConfig, ctx: TrainContext):
        self.cfg = cfg
        self.ctx = ctx
        self.loss_reduction = ctx.training.loss_reduction

    def prepare(self, model: torch.nn.Module) -> None:
        """Build or load offline artifacts (via ``self.ctx.store``)."""

    def build_train_data(self, rows: list["Example"]) -> list["Example"]:
        return rows

    def configure_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def grad_hooks(self, model: torch.nn.Module) -> dict[torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]:
        return {}

    def packing_unsupported(self) -> str | None:
        """Why this method cannot train on packed batches (``training.packing``), or None when it
        can. The loop then trains on padded batches and the record says so."""
        return None

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

    @classmethod
    def check_config(cls, node: DictConfig, cfg: DictConfig, key: str, stage: str) -> None:
        """Refuse a bad setting before any model loads (pre-flight calls it for ``method`` when
        ``stage=finetune`` and for ``alignment.method`` when the alignment stage runs). ``node`` is
        the method's config node, found at config key ``key`` (``method`` or ``alignment.method``),
        ``stage`` the stage it runs in (``finetune`` or ``align``: then it trains with
        ``cwac.alignment.alignment_training(cfg)``), ``cfg`` the whole experiment config, read-only.
        Raise ``cwac.schema.ConfigError`` naming the key (e.g. ``f"{key}.lam"``), the bad value and the
        fix. Checks that need the model stay in ``prepare``. The base class (SFT) accepts every node."""

    @classmethod
    def planned_memory(cls, cfg: DictConfig, spec: "PlanSpec") -> dict[str, int]:
        """Bytes of the method's own tensors on one rank at the peak of each phase, for a run of
        ``cfg`` (the ``method`` node) on a model of ``spec`` (``cwac.memory.PlanSpec``), without
        building anything. Keys from ``cwac.memory.key(name, phase, host)``; the fine-tune's own
        parameters, gradients, optimizer state and activations are the plan's, not the method's.
        The base class (SFT) holds nothing extra."""
        return {}


#: every method by name; entries are written in ``cwac/experiment/plugins.py`` only
METHODS: Registry[Method] = Registry("method", Method)
