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

The proximal term acts through its gradient: a gradient hook per trainable parameter adds
``rho (w - w_tilde)`` on the first micro-batch of every step (one parameter at a time, the
difference in float32 and freed at once; the same gradient as ``rho/2 ||w - w_tilde||^2`` in the
loss, divided by the accumulation steps and summed over micro-batches). The anchor ``w_tilde`` is
kept in the dtype the model trains in (on the CPU with ``offload: true``) and taken inside the
same hooks at the first step after a switch, i.e. the weights after the switching step's update,
so under ZeRO-3 it needs no gather: the hook sees the module's gathered weights and the full
gradient. ``metrics/proximal`` (rho/2 ||w - w_tilde||^2, when active) and
``metrics/lisa_drift_sq`` (||w - w_tilde||^2) are measured there, at the start of the step. The
hook adds an unscaled gradient, so fp16 (whose loss scaling it would bypass) is refused. With
several ranks at ZeRO-3 every parameter's anchor belongs to one rank (``baselines._common.owners``),
which alone keeps it and adds ``world x`` the proximal gradient (DeepSpeed averages over the
ranks), so each rank holds about 1 / world of the anchors; the logged values are summed over ranks.

Scale: the organism's K_a / K_f = 2 / 8 (conf/method/lisa.yaml) and the reference's 100 / 900 at
``budget=paper`` (conf/method_budget/lisa/paper.yaml).
"""

from __future__ import annotations

import random

import torch

from baselines._common import full_in_hook, numel, owners, rank_world, refuse_fp16, sum_over_ranks
from baselines._data import alignment_pool
from cwac.modeling import unwrap_engine
from cwac.data.examples import Example
from cwac.data.prompts import batch_rows, collate, is_packed, pad_id
from cwac.api import LossOutput, Method
from cwac.schema import ConfigError

ALIGN, FINETUNE = 1, 0


class Lisa(Method):
    stages = ("finetune",)

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """The step counts of the two states, and no fp16 (``refuse_fp16``)."""
        steps = {k: node[k] for k in ("align_steps", "finetune_steps")}
        bad = [k for k, v in steps.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad or sum(steps.values()) == 0:
            shown = " ".join(f"{key}.{k}={v!r}" for k, v in steps.items())
            raise ConfigError(f"config {shown} is not valid: both must be integers >= 0, not both 0 "
                              f"(conf/method/lisa.yaml: align_steps=2, finetune_steps=8)")
        try:
            refuse_fp16(cfg.training, "lisa")
        except ValueError as e:
            raise ConfigError(f"config {e}") from None

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.k_align, self.k_ft = int(cfg.align_steps), int(cfg.finetune_steps)
        self.rho = float(cfg.rho)
        self.offload = bool(cfg.offload)
        self.anchor: dict[str, torch.Tensor] = {}
        self._snap: set[str] = set()         # parameters to snapshot at their next hook
        self._step: int | None = None        # the step whose first micro-batch armed the hooks
        self._pending: set[str] = set()      # hooks that still owe this step's term
        self._prox_on = False
        self._drift: list[torch.Tensor] = []
        self.world, self.sharded, self.mine = 1, False, set()   # set by grad_hooks
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

    def _hook(self, name: str, p: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if name not in self._pending:   # a later micro-batch of the same step
                return grad
            self._pending.discard(name)
            if self.sharded and name not in self.mine:   # another rank's anchor and term
                return grad
            if self.sharded and p.ds_status.name != "AVAILABLE":
                raise RuntimeError(f"Lisa: {name} is not gathered in its gradient hook under ZeRO-3; "
                                   "train at training.zero_stage=2")
            with torch.no_grad(), full_in_hook([] if self.sharded else [p]):
                if name in self._snap:   # w_tilde: the starting weights, then the weights after each switch
                    self.anchor[name] = p.detach().to("cpu" if self.offload else p.device, copy=True)
                    self._snap.discard(name)
                diff = p.detach().float() - self.anchor[name].to(p.device, torch.float32, non_blocking=True)
                self._drift.append((diff * diff).sum())
                if self._prox_on:
                    return grad + (self.rho * (self.world if self.sharded else 1) * diff).to(grad.dtype)
            return grad

        return hook

    def grad_hooks(self, model) -> dict:
        params = self._trainable(model)
        self._names = list(params)
        rank, self.world = rank_world()
        self.sharded = self.world > 1 and int(self.ctx.training.zero_stage) >= 3
        own = owners({n: numel(p) for n, p in params.items()}, self.world) if self.sharded else {}
        self.mine = {n for n in params if not self.sharded or own[n] == rank}
        self._snap |= {n for n in self.mine if n not in self.anchor}   # before the first switch: the starting weights
        return {p: self._hook(n, p) for n, p in params.items()}

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        if step != self._step:   # the first micro-batch of an optimizer step arms every hook once
            self._step, self._pending, self._drift = step, set(getattr(self, "_names", ())), []
            self._prox_on = self.proximal_active(step)
        state = self.state(step)
        return LossOutput({"alignment" if state == ALIGN else "task": self.task_loss(model, batch)},
                          {"lisa_state": float(state)})

    def after_step(self, model, step: int) -> dict[str, float]:
        self._step = None
        self.states.append(self.state(step))
        out = {"lisa_state": float(self.state(step))}
        if self._drift or self.sharded:
            local = torch.stack([d.detach().double().cpu() for d in self._drift]).sum() if self._drift else torch.zeros(())
            drift = sum_over_ranks(local) if self.sharded else float(local)   # collective: every rank, every step
            out["lisa_drift_sq"] = drift
            if self._prox_on:
                out["proximal"] = self.rho / 2 * drift
        self._drift = []
        if self.state(step + 1) != self.state(step) and step + 1 < self.total_steps():
            self._snap = set(self.mine)   # snapshot at the next step's hooks: after this update
            self.switches.append(step)
        return out

    def record_info(self) -> dict:
        return {"align_steps": self.k_align, "finetune_steps": self.k_ft, "rho": self.rho, "offload": self.offload,
                "sharded_over_ranks": self.world if self.sharded else 1, "n_anchors_held": len(self.mine),
                "prox_off_fraction": float(self.cfg.prox_off_fraction), "pool_rows": len(getattr(self, "pool", [])),
                "n_alignment_steps": sum(s == ALIGN for s in self.states), "n_steps": len(self.states),
                "switch_steps": self.switches}

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """Lisa's own tensors (docs/scale.md): the anchor w_tilde of every trainable parameter in the
        model dtype (each rank its share under ZeRO-3; on the CPU with ``offload``) and one
        parameter's fp32 difference at a time in the proximal gradient hook."""
        from cwac.memory import key

        b = spec.dtype_bytes
        host = bool(cfg.offload)
        return {key("anchor w_tilde (model dtype)", host=host): spec.sharded(spec.trainable * b),
                key("proximal hook: one parameter's fp32 w - w_tilde"): 2 * spec.shapes.largest_tensor * 4}
