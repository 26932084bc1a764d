"""The one training loop, shared by every method and both stages, run by the DeepSpeed engine.

On a CPU machine it runs in one process (``DS_ACCELERATOR=cpu``, gloo); with CUDA the model
sits on this rank's GPU (``train_device``, nccl) and every batch is moved to the engine's
device. Under the ``deepspeed`` launcher it runs unchanged with several ranks (each rank takes
its shard of every global batch). Methods plug in through ``cwac.api.Method`` hooks only, and every caller (a fine-tuning
cell, the alignment stage, the benchmarks) runs a method through ``fit``, the one lifecycle.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cwac.data.prompts import collate, pad_id
from cwac.api import Method
from cwac.data.examples import Example
from cwac.data.prompts import PromptFormatter
from cwac.utils import cpu_clock, host_info, other_cores, stable_hash

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    packing: dict = field(default_factory=dict)         # requested / used / why not (``packing_plan``)
    other_cores: float | None = None   # cores other processes kept busy meanwhile (``utils.other_cores``)
    resumed_from: int | None = None    # the checkpoint's step this run went on from (``cwac.resume``), None: from 0
    segments: list[dict] = field(default_factory=list)   # one per process that trained: first step, host, threads


def packing_plan(tc: DictConfig, method: Method) -> dict:
    """Whether the loop trains on packed batches: ``training.packing``, unless the method says it
    cannot (``Method.packing_unsupported``), in which case it falls back to padded ones."""
    why = method.packing_unsupported() if tc.packing else None
    if why:
        log.warning("training.packing=true but %s: training on padded batches", why)
    return {"requested": bool(tc.packing), "used": bool(tc.packing) and why is None, "fallback_reason": why}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_rendezvous(env=os.environ) -> dict[str, str]:
    """The launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a SLURM
    job step with several tasks (``hydra/launcher=slurm hydra.launcher.tasks_per_node=8``: one
    task per GPU, each running the cell), read from SLURM's own variables; {} when there is one
    task or a launcher already set them."""
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
    head = nodes.split(",")[0]
    if "[" in head:   # e.g. gpu[003-004,007] -> gpu003
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", head),
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))}


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed for DeepSpeed; single-process defaults when no launcher."""
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.update(slurm_rendezvous())
        # No launcher (or variables we set ourselves and a child process inherited, whose port
        # the parent may still hold): a single-rank group on a fresh local port.
        if "RANK" not in os.environ or os.environ.get("CWAC_SELF_RENDEZVOUS") == "1":
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                               "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CWAC_SELF_RENDEZVOUS": "1"})
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def train_device() -> torch.device:
    """Where the model trains and the offline pieces (subspace, SAE, references) are computed:
    this rank's GPU when CUDA is available and DeepSpeed is not pinned to the CPU
    (``DS_ACCELERATOR=cpu``), else the CPU. DeepSpeed puts its engine on the same device."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        local = int(os.environ.get("LOCAL_RANK", slurm_rendezvous().get("LOCAL_RANK", "0")))
        n = torch.cuda.device_count()   # a task that sees one GPU (CUDA_VISIBLE_DEVICES per task) uses cuda:0
        return torch.device("cuda", local % n if n else local)
    return torch.device("cpu")


def to_device(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on ``train_device()`` (and that GPU made current)."""
    dev = train_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return model.to(dev)


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launcher's ``RANK`` before the group exists."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def deepspeed_config(tc: DictConfig) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "gradient_clipping": tc.max_grad_norm,
        "zero_optimization": {"stage": tc.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    extra = tc.get("deepspeed_extra")   # an optional key (conf/hydra/launcher/slurm.yaml); deep-merged: an offload block keeps zero_optimization.stage
    if extra:
        cfg = OmegaConf.to_container(OmegaConf.merge(cfg, extra), resolve=True)
    return cfg


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        raise ValueError(f"training.lr_schedule must be constant, linear or cosine, got {schedule!r}")
    return f


def batch_order(n: int, epochs: int, seed: int) -> list[int]:
    """Deterministic example order over all epochs (a fresh permutation per epoch)."""
    order: list[int] = []
    for e in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + e)
        order += torch.randperm(n, generator=g).tolist()
    return order


def grad_norm(params: list[torch.Tensor]) -> float | None:
    """Global L2 norm of the gradients held by ``params`` (before clipping), None without any."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


_LR_HINT = "lower training.lr (or keep training.max_grad_norm > 0), or check the rows it trained on"


def check_finite_loss(losses: dict[str, torch.Tensor], step: int) -> None:
    """Raise FloatingPointError naming the loss term(s) that are not finite at optimizer ``step``
    (1-based, as in train_log.jsonl)."""
    bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
    if bad:
        vals = {k: float(v.detach()) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite loss term(s) {', '.join(bad)} at step {step} (1-based, as in "
                                 f"train_log.jsonl): {vals}; {_LR_HINT}")


def check_finite_grad_norm(gn: float, step: int, fp16: bool = False) -> None:
    """Raise FloatingPointError when the gradient norm of optimizer ``step`` (1-based) is not
    finite. Under fp16 an overflow is the loss scaler's to skip (the weights are checked after
    training instead)."""
    if not math.isfinite(gn) and not fp16:
        raise FloatingPointError(f"non-finite grad_norm ({gn}) at step {step} (1-based, as in train_log.jsonl): "
                                 f"the gradients are not finite, so the weights are not either; {_LR_HINT}")


def check_finite_weights(model: torch.nn.Module, steps: int) -> None:
    """Raise FloatingPointError naming the first parameter with a non-finite value after training."""
    for name, p in model.named_parameters():
        if p.numel() and not torch.isfinite(p.detach()).all():
            raise FloatingPointError(f"non-finite weights in {name} after training ({steps} steps): the model "
                                     f"cannot be evaluated; {_LR_HINT}")


def plan_steps(n_examples: int, tc: DictConfig, world: int) -> int:
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world
    per_epoch = max(1, n_examples // global_batch)  # drop the last partial global batch
    steps = per_epoch * tc.epochs
    if tc.max_steps:
        steps = min(steps, tc.max_steps)
    return steps


def unpartition_zero3(engine) -> None:
    """Give the trained module its full weights back after ZeRO-3.

    Under stage 3 every parameter outside a forward pass is an empty placeholder, filled only by
    DeepSpeed's module hooks. Code after training reads weights directly (SafeLoRA's
    projection, CWAC's drift diagnostics, ``save_pretrained`` for the vLLM backend, which
    would otherwise write empty tensors), so the parameters are gathered on every rank, the
    engine's hooks are removed, and the module becomes an ordinary ``nn.Module`` again.
    """
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        full = [p.data.clone() for p in params]
    engine.destroy()  # removes the ZeRO-3 forward/backward hooks
    for h in ("module_forward_pre_hook", "module_forward_post_hook"):   # the engine's own (its forward prologue
        if getattr(engine, h, None) is not None:                      # would wrap the parameter dicts again)
            getattr(engine, h).remove()
    for p, f in zip(params, full):
        p.data = f
        for attr in ("ds_id", "_z3_optimizer"):   # code that asks "is this a ZeRO-3 parameter?" now reads p.data
            if hasattr(p, attr):
                delattr(p, attr)
    for m in module.modules():   # DeepSpeed's parameter dicts gather on access; plain dicts again
        if type(m._parameters) is not dict:
            m._parameters = dict(m._parameters)


def train(model: torch.nn.Module, features: list[dict], method: Method, tc: DictConfig, tokenizer,
          seed: int, logger=None, desc: str = "train", resume_dir=None) -> TrainResult:
    """Train ``model`` in place on tokenised ``features`` with ``method``'s hooks.

    With ``resume_dir`` and ``training.checkpoint_minutes`` > 0 the loop checkpoints itself there
    and a later call with the same folder goes on from the newest checkpoint (``cwac.resume``)."""
    import deepspeed

    from cwac.resume import Checkpointer

    rank, world = init_distributed()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: the method froze everything")
    steps = plan_steps(len(features), tc, world)
    opt = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas),
                            fused=bool(tc.fused_adamw) or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.lr_schedule, int(tc.warmup_ratio * steps), steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(tc))
    handles = [p.register_hook(fn) for p, fn in method.grad_hooks(engine.module).items()]
    ckpt = Checkpointer(resume_dir, tc.get("checkpoint_minutes") or 0, method, rank=rank, world=world,
                        fingerprint={"steps": steps, "rows": stable_hash(features), "seed": seed, "desc": desc,
                                     "training": {k: v for k, v in OmegaConf.to_container(tc, resolve=True).items()
                                                  if k not in ("progress", "log_every", "checkpoint_minutes")}})

    device = engine.device if engine.device is not None else next(engine.module.parameters()).device
    order = batch_order(len(features), tc.epochs, seed)
    mb, acc = tc.micro_batch_size, tc.gradient_accumulation_steps
    pad = pad_id(tokenizer)
    plan = packing_plan(tc, method)
    history: list[dict] = []
    t0, clock0 = time.time(), cpu_clock()
    pos, start, prior_seconds, segments = 0, 0, 0.0, []
    loop = ckpt.load(engine)
    if loop is not None:   # go on where the checkpoint left off; its rows go to the logger again
        start, pos, history, prior_seconds = loop["step"], loop["pos"], loop["history"], loop["seconds"]
        segments = loop["segments"]
        for row in history if logger is not None else ():
            logger.log({f"{desc}/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
    host = host_info()
    segments = [*segments, {"from_step": start, "cpu": host["cpu"], "isa": host["isa"], "gpu": host["gpu"],
                            "torch_threads": host["torch_threads"]}]
    # DeepSpeed's ZeRO-0 fp32 path clips without keeping the norm; compute it ourselves there.
    own_norm, gn_own = int(tc.zero_stage) == 0, None
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps,
               disable=not is_main_process() or not tc.progress, dynamic_ncols=True)
    try:
        for step in bar:
            sums: dict[str, float] = {}
            for _ in range(acc):
                global_ids = order[pos: pos + mb * world]
                pos += mb * world
                ids = global_ids[rank * mb: (rank + 1) * mb]
                batch = collate([features[i] for i in ids], pad, packed=plan["used"])
                batch = method.replace_batch(batch, step)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = method.compute_loss(engine, batch, step)
                loss = out.total
                if not torch.isfinite(loss):
                    check_finite_loss(out.losses, step + 1)   # names the term that went bad
                    raise FloatingPointError(f"non-finite total loss at step {step + 1} (1-based, as in train_log.jsonl)")
                engine.backward(loss)
                if own_norm and engine.is_gradient_accumulation_boundary():
                    gn_own = grad_norm(trainable)   # what the optimizer sees: accumulated, all-reduced, projected
                engine.step()
                for k, v in out.losses.items():
                    sums[f"losses/{k}"] = sums.get(f"losses/{k}", 0.0) + float(v.detach()) / acc
                for k, v in out.metrics.items():
                    sums[f"metrics/{k}"] = sums.get(f"metrics/{k}", 0.0) + float(v) / acc
            sums["losses/total"] = sum(v for k, v in sums.items() if k.startswith("losses/"))
            for k, v in method.after_step(engine.module, step).items():
                sums[f"metrics/{k}"] = float(v)
            sums["lr"] = sched.get_last_lr()[0]
            gn = engine.get_global_grad_norm()
            gn = gn_own if gn is None else gn
            if gn is not None:
                sums["grad_norm"] = float(gn)
            sums["step"] = step + 1
            history.append(sums)
            bar.set_postfix(loss=f"{sums['losses/total']:.3f}")
            finite = math.isfinite(sums.get("grad_norm", 0.0))
            if logger is not None and ((step + 1) % tc.log_every == 0 or step + 1 == steps or not finite):
                logger.log({f"{desc}/{k}": v for k, v in sums.items() if k != "step"}, step=step + 1)
            check_finite_grad_norm(sums.get("grad_norm", 0.0), step + 1, fp16=tc.precision == "fp16")
            ckpt.maybe_save(engine, {"step": step + 1, "pos": pos, "history": history, "segments": segments,
                                     "seconds": prior_seconds + time.time() - t0})
    finally:
        for h in handles:
            h.remove()
    if int(tc.zero_stage) >= 3:
        unpartition_zero3(engine)
    check_finite_weights(model, steps)   # once: a NaN update never becomes a complete record
    ckpt.finish()
    model.eval()
    return TrainResult(steps=steps, seconds=prior_seconds + time.time() - t0, history=history, packing=plan,
                       other_cores=other_cores(clock0, cpu_clock()), resumed_from=start if loop is not None else None,
                       segments=segments)


@dataclass
class FitResult:
    model: torch.nn.Module   # the trained model (after ``post_train``; may be a new object)
    rows: list[Example]      # the rows it trained on (after ``build_train_data``)
    train: TrainResult
    prepare_seconds: float


def fit(method: Method, model: torch.nn.Module, rows: list[Example], tc: DictConfig, *, tokenizer,
        formatter: PromptFormatter, seed: int, logger=None, desc: str = "train", resume_dir=None) -> FitResult:
    """Run ``method`` over its whole lifecycle on ``rows`` with the training node ``tc``:
    prepare -> build_train_data -> configure_model -> train -> post_train.

    The fine-tuning cell, the alignment stage and the benchmarks all call this, so a hook runs
    at the same point everywhere. ``resume_dir``: where the loop checkpoints itself (``train``).
    """
    t = time.time()
    method.prepare(model)
    prepare_seconds = time.time() - t
    rows = method.build_train_data(rows)
    feats = [formatter.train_features(e, tc.max_len) for e in rows]
    model = method.configure_model(model)
    res = train(model, feats, method, tc, tokenizer, seed, logger=logger, desc=desc, resume_dir=resume_dir)
    model = method.post_train(model)
    return FitResult(model=model, rows=rows, train=res, prepare_seconds=prepare_seconds)
