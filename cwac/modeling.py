"""Model plumbing, one copy for the whole project: what sits under the DeepSpeed engine and the
PEFT wrapper, where the decoder layers are, which modules are LoRA layers, and the canonical
(checkpoint) names of the linear maps.

Canonical names are the plain Hugging Face names (``model.layers.3.self_attn.q_proj``), so a
module of the training model is matched to the same tensor of the base / aligned checkpoints
by *name*. Matching by parameter order and substrings, as some reference code does, silently
mis-pairs when orders differ (docs/baselines.md, SafeLoRA's pitfalls).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

#: every linear map of a Llama-style decoder layer (attention + MLP)
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."


def unwrap_engine(model) -> nn.Module:
    """The ``nn.Module`` behind a DeepSpeed engine (or the module itself). A PEFT wrapper is kept."""
    engine = sys.modules.get("deepspeed.runtime.engine")   # no engine can exist before deepspeed is imported
    if engine is not None and isinstance(model, engine.DeepSpeedEngine):
        return model.module
    return model


def hf_model(model) -> nn.Module:
    """The plain transformers ``*ForCausalLM`` below a DeepSpeed engine and a PEFT wrapper."""
    m = unwrap_engine(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers`` for Llama, Mistral, Gemma, Qwen, SmolLM)."""
    m = hf_model(model)
    dec = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(m).__name__}: expected "
                         "`model.get_decoder().layers` to be an nn.ModuleList (Llama-style architecture)")
    return layers


def model_device(model) -> torch.device:
    return next(hf_model(model).parameters()).device


def is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer: the frozen ``base_layer`` plus the ``lora_A`` / ``lora_B`` factors."""
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def base_linear(module: nn.Module) -> nn.Module:
    """The plain linear map of a module (a LoRA layer's frozen ``base_layer``)."""
    return module.base_layer if is_lora(module) else module


def base_weight(module: nn.Module) -> nn.Parameter:
    return base_linear(module).weight


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, scaling) of a PEFT LoRA linear with one active adapter; Delta W = scaling * B A."""
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter, got {active}")
    name = active[0]
    return module.lora_B[name].weight, module.lora_A[name].weight, float(module.scaling[name])


def canonical(name: str) -> str:
    """Module name without the PEFT prefix: the name of its weight in a plain checkpoint."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def linear_modules(model, suffixes) -> dict[str, nn.Module]:
    """Canonical name -> module, for every decoder linear map whose name ends with one of ``suffixes``
    (a LoRA-wrapped linear is returned as the PEFT layer; its base weight is ``.base_layer.weight``)."""
    suffixes = tuple(suffixes)
    out: dict[str, nn.Module] = {}
    for name, mod in unwrap_engine(model).named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in suffixes or ".layers." not in f".{name}":
            continue
        if is_lora(mod) or (isinstance(mod, nn.Linear) and not name.endswith(".base_layer")):
            out[canonical(name)] = mod
    if not out:
        raise ValueError(f"no decoder linear maps named {list(suffixes)} in {type(hf_model(model)).__name__}")
    return out


def layer_index(name: str) -> int:
    """Decoder layer index of a module name (``model.layers.7.mlp.up_proj`` or ``layers.7.mlp`` -> 7)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
