"""Model plumbing shared by the baselines: unwrap the DeepSpeed engine / PEFT wrapper, find the
decoder layers and the linear maps by their canonical (checkpoint) names, and read single
tensors from a checkpoint folder without loading the whole model.

Canonical names are the plain Hugging Face names (``model.layers.3.self_attn.q_proj``), so a
module of the training model is matched to the same tensor of the base / aligned checkpoints
by *name*; the reference code (SafeLoRA, AsFT) matches by parameter order and substrings,
which silently mis-pairs when orders differ (baselines.md, SafeLoRA pitfalls).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

#: every linear map of a Llama-style decoder layer (attention + MLP)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."


def unwrap(model) -> nn.Module:
    """The ``nn.Module`` behind a DeepSpeed engine (or the module itself)."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # pragma: no cover - deepspeed is a hard requirement of the trainer
        return model
    return model.module if isinstance(model, DeepSpeedEngine) else model


def hf_model(model) -> nn.Module:
    """The plain transformers model (below a PEFT wrapper and a DeepSpeed engine)."""
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def decoder_layers(model) -> nn.ModuleList:
    """The decoder's list of transformer blocks (``model.model.layers`` for Llama/Mistral/Gemma)."""
    m = hf_model(model)
    dec = m.get_decoder() if hasattr(m, "get_decoder") else m
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(m).__name__}: expected "
                         "`model.get_decoder().layers` to be an nn.ModuleList (Llama-style architecture)")
    return layers


def canonical(name: str) -> str:
    """Module name without the PEFT prefix: the name of its weight in a plain checkpoint."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, scaling) of a PEFT LoRA linear with one active adapter; Delta W = scaling * B A."""
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter, got {active}")
    name = active[0]
    return module.lora_B[name].weight, module.lora_A[name].weight, float(module.scaling[name])


def linear_modules(model, suffixes) -> dict[str, nn.Module]:
    """Canonical name -> module, for every decoder linear map whose name ends with one of ``suffixes``
    (a LoRA-wrapped linear is returned as the PEFT layer; its base weight is ``.base_layer.weight``)."""
    suffixes = tuple(suffixes)
    out: dict[str, nn.Module] = {}
    for name, mod in unwrap(model).named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in suffixes or ".layers." not in f".{name}":
            continue
        if is_lora(mod) or (isinstance(mod, nn.Linear) and not name.endswith(".base_layer")):
            out[canonical(name)] = mod
    if not out:
        raise ValueError(f"no decoder linear maps named {list(suffixes)} in {type(hf_model(model)).__name__}")
    return out


def base_weight(module: nn.Module) -> nn.Parameter:
    return module.base_layer.weight if is_lora(module) else module.weight


def layer_index(name: str) -> int:
    """Decoder layer index of a canonical module name (``model.layers.7.mlp.up_proj`` -> 7)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def resolve_targets(targets, training_cfg) -> list[str]:
    """Which linear maps a weight-space baseline acts on.

    ``auto``: the LoRA-adapted maps when ``training.lora.enabled`` (what the AsFT / SafeLoRA
    reference code does), every decoder linear map under full fine-tuning (all of them are
    trained, so all of them get the constraint). A list is used as given.
    """
    if targets in (None, "auto"):
        if training_cfg.lora.enabled:
            return sorted(str(t) for t in training_cfg.lora.target_modules)
        return list(ALL_LINEAR)
    if isinstance(targets, str):
        raise ValueError(f"targets must be 'auto' or a list of module names such as {list(ALL_LINEAR)}, got {targets!r}")
    return [str(t) for t in targets]


def checkpoint_folder(path: str, hub_ok: bool) -> Path:
    """Local folder of a checkpoint (downloading the safetensors from the hub only when allowed)."""
    p = Path(path)
    if p.exists():
        return p
    if not hub_ok:
        raise FileNotFoundError(f"checkpoint {path} is not a local folder and the run is offline; "
                                "download it first or set offline=false")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))


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
