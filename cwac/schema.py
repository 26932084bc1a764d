"""Typed schemas of the config nodes that code depends on, checked before anything loads.

A schema names every key of a node and its type; the values (the defaults) live in the YAML
only, so every field here is required (``MISSING``) except keys that are optional by design.
``check_node`` merges a copy of a composed node into its schema (OmegaConf structured configs):
a misspelt key, a missing key or a value of the wrong type fails with the key's full path. The
composed config itself is left as it is, so the schemas change no config hash.

The training node's schema is ``TrainingConfig``; a method's own node is checked against the
``schema`` attribute of its ``Method`` class (``cwac.constraints.method.CWAC.schema`` is
``CWACConfig``). ``CHOICES`` lists every enumerated setting with its valid values, and
``check_choices`` refuses any other value, naming the key, the value and the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class LoraConfig:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class TrainingConfig:
    """``conf/training/full.yaml`` (every key documented there)."""

    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    lr_schedule: str = MISSING
    warmup_ratio: float = MISSING
    max_grad_norm: float = MISSING
    fused_adamw: bool = MISSING
    zero_stage: int = MISSING
    precision: str = MISSING
    loss_reduction: str = MISSING
    packing: bool = MISSING
    epochs: int = MISSING
    micro_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    max_len: int = MISSING
    max_steps: Optional[int] = MISSING
    log_every: int = MISSING
    progress: bool = MISSING
    checkpoint_minutes: float = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed_extra: Optional[Any] = None   # optional: deep-merged into DeepSpeed's config (offload)


@dataclass
class CWACPrompts:
    seed: int = MISSING
    n_heldout: int = MISSING
    n_train: Optional[int] = MISSING
    n_calibration: int = MISSING
    filter_refused: bool = MISSING
    refusal_max_new_tokens: int = MISSING
    min_refused_fraction: float = MISSING
    max_prompt_tokens: int = MISSING
    batch_size: int = MISSING


@dataclass
class CWACWeight:
    enabled: bool = MISSING
    targets: Any = MISSING               # a module name, a list of names, or "all"
    layers: Optional[list[int]] = MISSING
    mode: str = MISSING
    selection: str = MISSING
    energy: float = MISSING
    threshold: float = MISSING
    null_tol: float = MISSING
    rank: Optional[int] = MISSING
    cov_dtype: str = MISSING
    mask_shared_prefix: bool = MISSING
    basis_tol: float = MISSING
    project_at: str = MISSING


@dataclass
class CWACSelection:
    criterion: str = MISSING
    values: str = MISSING
    harmless_set: str = MISSING
    n_harmless: int = MISSING


@dataclass
class CWACActivation:
    enabled: bool = MISSING
    layer: Optional[int] = MISSING
    relative_depth: float = MISSING
    lam: float = MISSING
    n_latents: int = MISSING
    batch_prompts: int = MISSING
    pooling: str = MISSING
    reduction: str = MISSING
    scale: str = MISSING
    early_exit: bool = MISSING
    selection: CWACSelection = field(default_factory=CWACSelection)


@dataclass
class SAEHubCorpus:
    """``sae.corpus.hub``: the benign text of ``benign_source: hub`` (conf/method_budget/cwac/paper.yaml)."""

    dataset: str = MISSING
    name: Optional[str] = MISSING
    split: str = MISSING
    text_field: str = MISSING
    shuffle_buffer: int = MISSING


@dataclass
class SAEHarmfulExtra:
    """``sae.corpus.harmful_extra``: unsafe prompts of a hub split for the SAE corpus
    (conf/method_budget/cwac/paper.yaml; cwac/constraints/sae_corpus.py)."""

    dataset: str = MISSING
    name: Optional[str] = MISSING
    split: str = MISSING
    prompt_field: str = MISSING
    safe_field: str = MISSING        # rows where it is false are kept
    n_prompts: Optional[int] = MISSING


@dataclass
class SAECorpus:
    tokens: int = MISSING
    harmful_fraction: float = MISSING
    benign_source: str = MISSING
    max_len: int = MISSING
    mask_shared_prefix: bool = MISSING
    skip_first_tokens: int = MISSING
    hub: Optional[SAEHubCorpus] = None   # optional: only benign_source=hub reads it (absent from cwac.yaml)
    harmful_extra: Optional[SAEHarmfulExtra] = MISSING
    chunk_tokens: Optional[int] = MISSING


@dataclass
class SAETrain:
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    lr_end_factor: float = MISSING
    lr_scheduler: str = MISSING
    warmup_steps: int = MISSING
    decay_steps: int = MISSING
    dead_feature_window: int = MISSING
    norm_estimate_batches: int = MISSING
    eval_fraction: float = MISSING
    device: str = MISSING


@dataclass
class CWACSAE:
    source: str = MISSING
    path: Optional[str] = MISSING
    release: Optional[str] = MISSING
    sae_id: Optional[str] = MISSING
    seed: int = MISSING
    expansion: int = MISSING
    k: int = MISSING
    apply_b_dec_to_input: bool = MISSING
    normalize_activations: str = MISSING
    rescale_acts_by_decoder_norm: bool = MISSING
    aux_loss_coefficient: float = MISSING
    decoder_init_norm: float = MISSING
    corpus: SAECorpus = field(default_factory=SAECorpus)
    train: SAETrain = field(default_factory=SAETrain)


@dataclass
class CWACDiagnostics:
    drift: bool = MISSING
    drift_tokens: int = MISSING
    latent_drift: bool = MISSING
    leak_every: int = MISSING
    grad_norm_every: int = MISSING


@dataclass
class CWACConfig:
    """``conf/method/cwac.yaml`` (every key documented there)."""

    name: str = MISSING
    prompts: CWACPrompts = field(default_factory=CWACPrompts)
    weight: CWACWeight = field(default_factory=CWACWeight)
    activation: CWACActivation = field(default_factory=CWACActivation)
    sae: CWACSAE = field(default_factory=CWACSAE)
    diagnostics: CWACDiagnostics = field(default_factory=CWACDiagnostics)


#: every enumerated setting of the experiment config -> its valid values (each is what the code that
#: reads it accepts; ``cwac.experiment.preflight`` checks them all before a model loads)
CHOICES: dict[str, tuple] = {
    "stage": ("finetune", "align"),
    "host_allocator": ("retain", "glibc"),   # cwac.host_allocator.MODES
    "model.source": ("tiny", "gguf", "hub"),
    "model.dtype": ("float32", "bfloat16", "float16"),   # cwac.models.DTYPES
    "model.prompt_format": ("chat", "alpaca"),
    "task.source": ("local", "hub"),
    "harmful.source": ("local", "hub"),
    "training.precision": ("fp32", "bf16", "fp16"),
    "training.zero_stage": (0, 1, 2, 3),
    "training.lr_schedule": ("constant", "linear", "cosine"),
    "training.loss_reduction": ("sequence", "token"),
    "eval.backend": ("hf", "vllm", "auto"),
    "eval.fa_match": ("exact", "substring"),
    "eval.fa_split": ("eval", "heldout"),
    "logger.name": ("wandb", "none"),
}


class ConfigError(ValueError):
    """A config value that no code path accepts; the message names the key, the value and the fix."""


def _show(values) -> str:
    return ", ".join(str(v) for v in values)


def check_choices(cfg: DictConfig, choices: dict[str, tuple] = CHOICES, prefix: str = "") -> None:
    """Raise ``ConfigError`` for the first key of ``choices`` whose value in ``cfg`` is not one of
    its valid values (keys absent from ``cfg`` are skipped; ``prefix`` is prepended in messages)."""
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if isinstance(value, str) and value == "__absent__":
            continue
        ok = value in valid and (isinstance(value, bool) == any(isinstance(v, bool) for v in valid))
        if not ok:
            raise ConfigError(f"config {prefix}{key}={value!r} is not valid; valid values: {_show(valid)}")


def check_node(node: DictConfig, schema: type, where: str) -> None:
    """Raise ``ValueError`` naming ``where.<key>`` when ``node`` does not fit ``schema``: an
    unknown (e.g. misspelt) key, a missing key, or a value of the wrong type."""
    typed = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(typed, OmegaConf.to_container(node, resolve=True))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        why = str(getattr(e, "msg", e)).splitlines()[0]
        raise ValueError(f"config {where}.{key}: {why} (schema {schema.__module__}.{schema.__qualname__}; "
                         "fix the key or its value)") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"config {where} lacks {', '.join(f'{where}.{k}' for k in missing)} "
                         f"(schema {schema.__module__}.{schema.__qualname__})")
