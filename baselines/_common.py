"""Checkpoint access for the weight-space baselines (AsFT, SafeLoRA): which linear maps they act
on, and single tensors read from a checkpoint folder without loading the whole model. Module
plumbing (engine / PEFT unwrapping, canonical names) is in ``cwac.modeling``.
"""

from __future__ import annotations

import json
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
