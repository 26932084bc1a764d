"""Checkpoint access for the weight-space baselines (AsFT, SafeLoRA): which linear maps they act
on, and single tensors read from a checkpoint folder without loading the whole model; and the
parameter access that works the same under ZeRO-3 (AsFT, Lisa, SafeLoRA). Module plumbing
(engine / PEFT unwrapping, canonical names) is in ``cwac.modeling``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from cwac.modeling import LINEAR_TARGETS
from cwac.models import locate_weights


def adapted_targets(targets, training_cfg) -> list[str]:
    """Which linear maps a weight-space baseline acts on.

    ``auto``: the LoRA-adapted maps when ``training.lora.enabled`` (what the AsFT / SafeLoRA
    reference code does), every decoder linear map under full fine-tuning (all of them are
    trained, so all of them get the constraint). A list is used as given.
    """
    if targets in (None, "auto"):
        if training_cfg.lora.enabled:
            return sorted(str(t) for t in training_cfg.lora.target_modules)
        return list(LINEAR_TARGETS)
    if isinstance(targets, str):
        raise ValueError(f"targets must be 'auto' or a list of module names such as {list(LINEAR_TARGETS)}, got {targets!r}")
    return [str(t) for t in targets]


def checkpoint_folder(path: str, hub_ok: bool) -> Path:
    """Local folder of a checkpoint: a folder, or a hub id's snapshot (downloading the safetensors
    only when allowed; offline, from the local Hugging Face cache, ``cwac.models.locate_weights``)."""
    p = Path(path)
    if p.exists():
        return p
    if not hub_ok:
        locate_weights(path, "checkpoint", "model.path or model.base_path", offline=True)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"], local_files_only=not hub_ok))


def read_tensors(path: str, names: list[str], hub_ok: bool = False, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Read ``names`` (checkpoint tensor names) from a safetensors checkpoint, one tensor at a time."""
    from safetensors import safe_open

    folder = checkpoint_folder(path, hub_ok)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").exists():
        weight_map = None
    else:
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json")
    by_file: dict[str, list[str]] = {}
    for n in names:
        if weight_map is not None and n not in weight_map:
            raise KeyError(f"tensor {n} is not in checkpoint {folder}")
        by_file.setdefault(weight_map[n] if weight_map else "model.safetensors", []).append(n)
    out = {}
    for fname, ns in by_file.items():
        with safe_open(str(folder / fname), framework="pt") as f:
            keys = set(f.keys())
            for n in ns:
                if n not in keys:
                    raise KeyError(f"tensor {n} is not in {folder / fname}")
                out[n] = f.get_tensor(n).to(dtype)
    return out


# ---- parameters under ZeRO-3 ------------------------------------------------------------------
# Under ZeRO-3 a parameter outside its module's forward / backward is an empty placeholder
# (``p.ds_id`` set, ``p.ds_status`` NOT_AVAILABLE) and each rank keeps only its shard. Inside a
# gradient (tensor) hook the module's weights are gathered (DeepSpeed fetches them for the
# backward), so hooks read ``p`` directly; code outside training gathers explicitly.
#
# Sharded references (AsFT's C / F and anchors, Lisa's anchors under ZeRO-3): every tensor of
# reference belongs to one rank (``owners``), which alone holds it and, in its gradient hook,
# adds ``world x`` the term's gradient; DeepSpeed averages gradients over the ranks, so the
# optimizer sees the term's gradient once, and each rank holds about 1 / world of the references.


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (full or not at the moment)."""
    return hasattr(p, "ds_id")


def gathered(params, modifier_rank: int | None = None):
    """Context in which every ZeRO-3 parameter of ``params`` holds its full value on every rank
    (``deepspeed.zero.GatheredParameters``; ``modifier_rank``: the rank whose in-place edits are
    broadcast and re-partitioned on exit). A no-op for ordinary parameters. Collective: every rank
    must enter it with the same parameters."""
    ps = [p for p in params if is_partitioned(p)]
    if not ps:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(ps, modifier_rank=modifier_rank)


@contextmanager
def full_in_hook(params):
    """Inside a gradient hook: ``params`` with their full values. Those DeepSpeed has already
    gathered for the backward are read as they are (gathering them again would re-partition them
    on exit, under DeepSpeed's feet); only ZeRO-3 parameters not available are gathered (every
    rank runs the same hooks in the same order, so the collective matches)."""
    missing = [p for p in params if is_partitioned(p) and p.ds_status.name != "AVAILABLE"]
    with gathered(missing):
        yield


def rank_world() -> tuple[int, int]:
    """(rank, world size): the process group's, else the launcher's variables (a method's ``prepare``
    may run before the loop initialises the group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def numel(p: torch.Tensor) -> int:
    """Elements of the full parameter (``ds_numel`` of a ZeRO-3 parameter, whose data may be empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Each name to one rank, balancing the ranks' total size (largest first, ties by name): the
    same answer on every rank, with no communication."""
    load, out = [0] * world, {}
    for n in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[n] = r
        load[r] += sizes[n]
    return out


def sum_over_ranks(x: torch.Tensor) -> float:
    """``x`` (a scalar) summed over the ranks of the process group (itself without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(x)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = x.detach().double().reshape(1).to(dev)
    torch.distributed.all_reduce(t)
    return float(t)


def train_dtype(training_cfg, p: torch.Tensor) -> torch.dtype:
    """The dtype ``p`` trains in: DeepSpeed casts the module to bf16 / fp16 under
    ``training.precision``; fp32 keeps the model's own dtype."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(training_cfg.precision), p.dtype)


def refuse_fp16(training_cfg, method: str) -> None:
    """Additive gradient hooks (AsFT, Lisa) would add an unscaled term to fp16's loss-scaled
    gradients: refuse fp16 with the fix."""
    if str(training_cfg.precision) == "fp16":
        raise ValueError(f"method={method} adds its penalty's gradient in a gradient hook, which fp16's loss "
                         "scaling would mis-scale: training.precision=fp16 is not supported; use "
                         "training.precision=bf16 (or fp32)")
