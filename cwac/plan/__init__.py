"""The memory plan: per component, the bytes each rank holds at the peak of a cell, without a GPU
and without weights (docs/scale.md).

    python -m cwac.plan model=llama3_8b_instruct method=cwac budget=paper
    python -m cwac.plan model=llama3_8b_instruct method=asft budget=paper plan.zero_stage=3 plan.gpus=8
    python -m cwac.plan model=gemma2_9b_it method=cwac budget=paper plan.zero_stage=3 plan.offload=true --json
    python -m cwac.plan --matrix --out results/benchmarks/memory_plan.json   # every method x paper model

The cell's config is composed from ``conf/`` exactly as ``run.py`` composes it, plus the
``plan`` node (``conf/plan/default.yaml``: ZeRO stage, offload, GPUs, GPU size). The model is built
on the meta device from its Hugging Face config (``conf/model/shapes/<model.name>.json`` offline,
the hub's config.json with ``offline=false``), so its shapes are exact and nothing is allocated.
The fine-tune's share is ``cwac.memory``'s; each method states its own tensors through
``Method.planned_memory``, looked up in the method registry. This package is orchestration (it
reads the registry), above the library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from cwac.memory import GIB, ModelShapes, Plan, PlanSpec, build_plan
from cwac.utils import CONF_DIR

SHAPES_DIR = Path(CONF_DIR) / "model" / "shapes"
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_config(cfg: DictConfig):
    """The transformers config of ``cfg.model``: the tiny model's from its sizes; a hub model's from
    the hub (``offline=false``) or from ``conf/model/shapes/<model.name>.json``; a local folder's
    config.json."""
    import json

    from transformers import AutoConfig, LlamaConfig

    m = cfg.model
    if m.source == "tiny":
        t = m.tiny
        return LlamaConfig(vocab_size=int(t.vocab_size), hidden_size=int(t.hidden_size),
                           intermediate_size=int(t.intermediate_size), num_hidden_layers=int(t.num_layers),
                           num_attention_heads=int(t.num_heads), num_key_value_heads=int(t.num_kv_heads),
                           max_position_embeddings=int(t.max_position_embeddings), tie_word_embeddings=False)
    path = m.get("path")
    if path and Path(str(path)).expanduser().is_dir():
        return AutoConfig.from_pretrained(str(Path(str(path)).expanduser()))
    if path and not cfg.offline:
        return AutoConfig.from_pretrained(str(path))
    local = SHAPES_DIR / f"{m.name}.json"
    if not local.exists():
        raise FileNotFoundError(f"no shapes for model.name={m.name!r}: {local} does not exist and the run is offline. "
                                f"Fix: run with offline=false to read {path or 'the model'}'s config.json from the hub, "
                                f"or add {local.name} with the model's config.json values ({SHAPES_DIR / 'SOURCE.md'})")
    values = {k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def model_shapes(cfg: DictConfig) -> ModelShapes:
    """``ModelShapes`` counted on the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    mc = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc)
    return ModelShapes.from_model(model, str(cfg.model.name))


@dataclass
class Layout:
    """The hardware a plan is for, resolved from the ``plan`` node and the training preset."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gpus: int
    gpu_gb: float
    reserve_gb: float
    host_gb: float | None
    device: str
    buckets: dict | None = None   # reduce_bucket / sub_group / prefetch from the DeepSpeed config

    def describe(self) -> str:
        off = "optimizer + parameters" if self.offload_params else ("optimizer" if self.offload_optimizer else "none")
        where = "CPU RAM" if self.device == "cpu" else f"{self.gpu_gb:g} GB GPU"
        return f"{self.gpus} x {where}, ZeRO-{self.zero_stage}, offload: {off}"


def _offloaded(node) -> bool:
    return bool(node) and str(node.get("device", "none")) in ("cpu", "nvme")


def layout(cfg: DictConfig) -> Layout:
    """ZeRO stage and offload from the ``plan`` node where it sets them, else from the DeepSpeed
    config the loop would generate for ``cfg.training`` (``cwac.trainer.deepspeed_config``)."""
    from cwac.trainer import deepspeed_config

    p = cfg.plan
    zo = deepspeed_config(cfg.training).get("zero_optimization", {})
    stage = int(p.zero_stage) if p.zero_stage is not None else int(zo.get("stage", 0))
    off_opt = bool(p.offload) if p.offload is not None else _offloaded(zo.get("offload_optimizer"))
    off_par = bool(p.offload_params) if p.offload_params is not None else _offloaded(zo.get("offload_param"))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"config plan.zero_stage={stage} is not valid; valid values: 0, 1, 2, 3")
    if int(p.gpus) < 1:
        raise ValueError(f"config plan.gpus={p.gpus} is not valid: it must be an integer >= 1, e.g. plan.gpus=8")
    if p.device not in ("cuda", "cpu"):
        raise ValueError(f"config plan.device={p.device!r} is not valid; valid values: cuda, cpu")
    from cwac.memory import PREFETCH, REDUCE_BUCKET, SUB_GROUP

    buckets = {"reduce_bucket": int(zo.get("reduce_bucket_size", REDUCE_BUCKET)),
               "sub_group": int(zo.get("sub_group_size", SUB_GROUP)),
               "prefetch": int(zo.get("stage3_prefetch_bucket_size", PREFETCH))}
    return Layout(zero_stage=stage, offload_optimizer=off_opt and stage >= 1, offload_params=off_par and stage >= 3,
                  gpus=int(p.gpus), gpu_gb=float(p.gpu_gb), reserve_gb=float(p.reserve_gb),
                  host_gb=None if p.host_gb is None else float(p.host_gb), device=str(p.device), buckets=buckets)


def lora_trainable(shapes: ModelShapes, targets: list[str], r: int) -> int:
    return shapes.n_layers * sum(r * (o + i) for t in targets for o, i in [shapes.linear(t)])


def plan_spec(cfg: DictConfig, shapes: ModelShapes, lay: Layout) -> PlanSpec:
    tc = cfg.training
    lora = bool(tc.lora.enabled)
    targets = tuple(str(t) for t in tc.lora.target_modules) if lora else ()
    return PlanSpec(shapes=shapes, dtype_bytes=PRECISION_BYTES[str(tc.precision)], world=lay.gpus,
                    zero_stage=lay.zero_stage, offload_optimizer=lay.offload_optimizer,
                    offload_params=lay.offload_params, micro_batch=int(tc.micro_batch_size), seq_len=int(tc.max_len),
                    trainable_params=lora_trainable(shapes, list(targets), int(tc.lora.r)) if lora else None,
                    lora=lora, lora_targets=targets, device=lay.device,
                    gradient_checkpointing=bool(tc.get("gradient_checkpointing", False)), **(lay.buckets or {}))


@dataclass
class Verdict:
    plan: Plan
    layout: Layout
    method: str

    @property
    def peak(self) -> tuple[str, int]:
        return self.plan.peak("device")

    @property
    def host_peak(self) -> tuple[str, int]:
        return self.plan.peak("host")

    @property
    def budget_bytes(self) -> int:
        return int((self.layout.gpu_gb - self.layout.reserve_gb) * GIB)

    @property
    def fits(self) -> bool:
        ok = self.peak[1] <= self.budget_bytes
        if self.layout.host_gb is not None:
            ok = ok and self.host_peak[1] <= self.layout.host_gb * GIB
        return ok

    def as_dict(self) -> dict:
        s = self.plan.spec
        phase, peak = self.peak
        hphase, hpeak = self.host_peak
        return {"model": s.shapes.name, "method": self.method, "layout": self.layout.__dict__,
                "layout_text": self.layout.describe(),
                "spec": {"params": s.shapes.n_params, "trainable": s.trainable, "dtype_bytes": s.dtype_bytes,
                         "world": s.world, "zero_stage": s.zero_stage, "offload_optimizer": s.offload_optimizer,
                         "offload_params": s.offload_params, "micro_batch": s.micro_batch, "seq_len": s.seq_len,
                         "lora": s.lora, "gradient_checkpointing": s.gradient_checkpointing},
                "components": [c.as_dict() for c in self.plan.components],
                "totals": {p: {"device_gib": round(self.plan.total(p, "device") / GIB, 3),
                               "host_gib": round(self.plan.total(p, "host") / GIB, 3)}
                           for p in ("prepare", "train", "post_train")},
                "peak_phase": phase, "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
                "host_peak_phase": hphase, "host_peak_gib": round(hpeak / GIB, 3),
                "budget_gib": round(self.budget_bytes / GIB, 3), "fits": self.fits,
                "margin_gib": round((self.budget_bytes - peak) / GIB, 3)}


def plan_cell(cfg: DictConfig, shapes: ModelShapes | None = None) -> Verdict:
    """The plan of the cell ``cfg`` (composed with the ``plan`` node) on its layout."""
    from cwac.experiment.plugins import get_method

    lay = layout(cfg)
    shapes = shapes or model_shapes(cfg)
    spec = plan_spec(cfg, shapes, lay)
    method = get_method(str(cfg.method.name))
    return Verdict(build_plan(spec, method.planned_memory(cfg.method, spec)), lay, str(cfg.method.name))
