"""Lisa: Lazy safety alignment by bi-state optimisation with a proximal term
(Huang et al., arXiv 2405.18641; reference code ``git-disl/Lisa/trainer.py``).

The fine-tuning run alternates two states, starting in alignment (as the reference does):
  * alignment: ``align_steps`` optimizer steps whose user batches are *replaced* by batches of
    alignment rows (the alignment recipe's harmful -> refusal and Alpaca rows,
    ``baselines._data.alignment_pool``);
  * fine-tune: ``finetune_steps`` steps on the user's batches.
Both states add ``rho/2 * ||w - w_tilde||^2`` over the trainable parameters, where ``w_tilde`` is
the snapshot taken at the *last state switch* (docs/baselines.md: the reference README names the
anchors the other way round; the code does this). The proximal term is off for the first
``prox_off_fraction`` (10%) of the steps. One AdamW state is shared by both states.

Steps vs micro-batches: the reference counts micro-batches, so with gradient accumulation it can
switch in the middle of an accumulated step. Here the state is a function of the optimizer
step: every micro-batch of a step is in the same state, the switch snapshot is taken in
``after_step`` (after the last micro-batch's update), and the alignment rows are drawn in
global order, so accumulation equals a larger batch exactly. The total number of steps is the
loop's (epochs x user batches), so the user batches of alignment steps are never seen, as in
the reference.
"""

from __future__ import annotations

import random

import torch

from cwac.modeling import unwrap_engine
from baselines._data import alignment_pool
from cwac.data.examples import Example
from cwac.data.prompts import batch_rows, collate, is_packed, pad_id
from cwac.api import LossOutput, Method

ALIGN, FINETUNE = 1, 0


class Lisa(Method):
    stages = ("finetune",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.k_align, self.k_ft = int(cfg.align_steps), int(cfg.finetune_steps)
        if self.k_align < 0 or self.k_ft < 0 or self.k_align + self.k_ft == 0:
            raise ValueError(f"method.align_steps and method.finetune_steps must be >= 0 and not both 0, "
                             f"got {self.k_align}/{self.k_ft}")
        self.rho = float(cfg.rho)
        self.anchor: dict[str, torch.Tensor] | None = None
        self.n_rows: int | None = None
        self.switches: list[int] = []   # steps after which the state switched (snapshot taken)
        self.states: list[int] = []     # state of each optimizer step

    # ---- schedule -------------------------------------------------------------------------
    def state(self, step: int) -> int:
        """ALIGN for the first ``align_steps`` of every cycle, FINETUNE for the rest."""
        return ALIGN if step % (self.k_align + self.k_ft) < self.k_align else FINETUNE

    def total_steps(self) -> int:
        from cwac.trainer import plan_steps

        if self.n_rows is None:
            raise RuntimeError("Lisa needs build_train_data to be called before training (it counts the rows)")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return plan_steps(self.n_rows, self.ctx.training, world)

    def proximal_active(self, step: int) -> bool:
        return self.rho > 0 and step > float(self.cfg.prox_off_fraction) * self.total_steps()

    # ---- hooks ----------------------------------------------------------------------------
    def prepare(self, model) -> None:
        rows: list[Example] = alignment_pool(self.ctx)
        if not rows:
            raise ValueError("Lisa's alignment pool is empty; check the alignment recipe (conf/alignment)")
        fmt, tc = self.ctx.formatter, self.ctx.training
        self.pool = [fmt.train_features(e, tc.max_len) for e in rows]
        self.order = list(range(len(self.pool)))
        random.Random(int(self.cfg.seed)).shuffle(self.order)
        self.cursor = 0      # global position in the (cyclic) alignment order
        self.pad = pad_id(self.ctx.tokenizer)

    def build_train_data(self, rows):
        self.n_rows = len(rows)
        return rows

    def replace_batch(self, batch: dict, step: int) -> dict:
        if self.state(step) != ALIGN:
            return batch
        mb = batch_rows(batch)
        rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                       if torch.distributed.is_initialized() else (0, 1))
        ids = [self.order[(self.cursor + rank * mb + i) % len(self.order)] for i in range(mb)]
        self.cursor += mb * world
        return collate([self.pool[i] for i in ids], self.pad, packed=is_packed(batch))   # as the batch it replaces

    def _trainable(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in unwrap_engine(model).named_parameters() if p.requires_grad}

    def _snapshot(self, model) -> None:
        self.anchor = {n: p.detach().clone() for n, p in self._trainable(model).items()}

    def proximal(self, model) -> torch.Tensor:
        """rho/2 * ||w - w_tilde||^2 over the trainable parameters."""
        params = self._trainable(model)
        return self.rho / 2 * torch.stack([((p.float() - self.anchor[n].float()) ** 2).sum()
                                           for n, p in params.items()]).sum()

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if self.anchor is None:  # w_tilde before the first switch: the starting weights
            self._snapshot(model)
        state = self.state(step)
        losses = {"alignment" if state == ALIGN else "task": self.task_loss(model, batch)}
        if self.proximal_active(step):
            losses["proximal"] = self.proximal(model)
        return LossOutput(losses, {"lisa_state": float(state)})

    @torch.no_grad()
    def after_step(self, model, step: int) -> dict[str, float]:
        self.states.append(self.state(step))
        drift = float(sum(((p.float() - self.anchor[n].float()) ** 2).sum()
                          for n, p in self._trainable(model).items()))
        if self.state(step + 1) != self.state(step) and step + 1 < self.total_steps():
            self._snapshot(model)
            self.switches.append(step)
        return {"lisa_state": float(self.state(step)), "lisa_drift_sq": drift}

    def record_info(self) -> dict:
        return {"align_steps": self.k_align, "finetune_steps": self.k_ft, "rho": self.rho,
                "prox_off_fraction": float(self.cfg.prox_off_fraction), "pool_rows": len(getattr(self, "pool", [])),
                "n_alignment_steps": sum(s == ALIGN for s in self.states), "n_steps": len(self.states),
                "switch_steps": self.switches}
