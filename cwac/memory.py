"""Memory arithmetic of one training run: the bytes each rank holds, per component, at the peak of
each phase (docs/scale.md explains the table and the assumptions).

Two halves:

* the fine-tune itself (``finetune_components``): parameters, gradients, optimizer state and
  activations for a DeepSpeed ZeRO stage, offload setting and world size, following the ZeRO paper's
  accounting (Rajbhandari et al., arXiv 1910.02054: mixed precision keeps 2 + 2 + 12 bytes per
  parameter, partitioned over the ranks by stage 1 / 2 / 3) and what the installed DeepSpeed
  allocates besides (reduce buckets, the fp32 gradient of one optimizer sub-group, gathered layers);
* a method's own tensors, which the method states itself through
  ``cwac.api.Method.planned_memory(cfg, spec)``: a ``{key: bytes}`` dict whose keys are made by
  ``key(name, phase, host)``.

Phases: ``train`` (added to the training step's peak), ``prepare`` (offline pieces, built with
the full model loaded and no optimizer yet), ``post_train`` (edits after training, with the full
weights gathered). The peak of a run is the largest phase. ``host`` entries live in CPU memory;
on a CPU run device and host are the same memory and are added.

Everything here is arithmetic on shapes (``ModelShapes``, counted from a model built on the meta
device); nothing allocates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 1024 ** 3
PHASES = ("prepare", "train", "post_train")
#: DeepSpeed defaults the generated config does not override (deepspeed.runtime.zero.config)
REDUCE_BUCKET = 500_000_000          # elements: reduce_bucket_size / the ZeRO-0 allreduce buffer
SUB_GROUP = 1_000_000_000            # elements: zero_optimization.sub_group_size (ZeRO-3)
PREFETCH = 50_000_000                # elements: stage3_prefetch_bucket_size


def key(name: str, phase: str = "train", host: bool = False) -> str:
    """The key of one entry of ``Method.planned_memory``: ``"<phase>|<device|host>|<name>"``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return f"{phase}|{'host' if host else 'device'}|{name}"


def parse_key(k: str) -> tuple[str, str, str]:
    """(phase, where, name) of a ``key``; a bare name is a device entry of the training phase."""
    parts = k.split("|", 2)
    if len(parts) == 3 and parts[0] in PHASES and parts[1] in ("device", "host"):
        return parts[0], parts[1], parts[2]
    return "train", "device", k


@dataclass(frozen=True)
class ModelShapes:
    """The shapes the plan needs, counted from a (meta-device) Hugging Face causal LM."""

    name: str
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    n_params: int                          # every parameter (a tied head counted once)
    layer_params: int                      # one decoder layer
    embed_params: int                      # the input embedding
    head_params: int                       # the LM head (0 when tied to the embedding)
    linears: tuple[tuple[str, int, int], ...] = ()   # (name, d_out, d_in) of one layer's linear maps
    norms_per_layer: int = 2               # RMSNorms per decoder layer (Gemma-2: 4)
    largest_tensor: int = 0                # elements of the largest single parameter

    @property
    def linear_params(self) -> int:
        """Elements of every decoder linear map (q, k, v, o, gate, up, down) of all layers."""
        return self.n_layers * sum(o * i for _, o, i in self.linears)

    def linear(self, name: str) -> tuple[int, int]:
        for n, o, i in self.linears:
            if n == name:
                return o, i
        raise KeyError(f"{self.name} has no linear map {name!r}; it has {[n for n, _, _ in self.linears]}")

    @classmethod
    def from_model(cls, model, name: str) -> "ModelShapes":
        """Count the shapes of ``model`` (any device, meta included: only ``.shape`` is read)."""
        from torch import nn

        cfg = model.config
        layers = model.get_decoder().layers
        layer = layers[0]
        linears = tuple((n.rsplit(".", 1)[-1], m.out_features, m.in_features)
                        for n, m in layer.named_modules() if isinstance(m, nn.Linear))
        norms = sum(1 for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower())
        params = {id(p): p for p in model.parameters()}          # a tied head is one tensor
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is emb
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return cls(name=name, d_model=int(cfg.hidden_size), d_ff=int(cfg.intermediate_size),
                   n_layers=len(layers), n_heads=heads,
                   n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
                   vocab=int(emb.shape[0]), tied=tied, n_params=sum(p.numel() for p in params.values()),
                   layer_params=sum(p.numel() for p in layer.parameters()), embed_params=emb.numel(),
                   head_params=0 if tied or head is None else head.weight.numel(), linears=linears,
                   norms_per_layer=max(1, norms), largest_tensor=max(p.numel() for p in params.values()))


@dataclass(frozen=True)
class PlanSpec:
    """What a method's ``planned_memory`` may read: the model's shapes, the training dtype, the
    DeepSpeed layout and the batch."""

    shapes: ModelShapes
    dtype_bytes: int = 4              # bytes per element of the trained weights (bf16 2, fp32 4)
    world: int = 1                    # data-parallel ranks
    zero_stage: int = 0
    offload_optimizer: bool = False   # fp32 masters, gradients and Adam moments on the CPU
    offload_params: bool = False      # ZeRO-3 only: the bf16 partitions on the CPU too
    micro_batch: int = 1
    seq_len: int = 512
    trainable_params: int | None = None   # None: every parameter (full fine-tuning)
    lora: bool = False
    lora_targets: tuple[str, ...] = ()   # the LoRA-adapted maps (training.lora.target_modules)
    device: str = "cuda"              # "cpu": device and host are one memory
    gradient_checkpointing: bool = False
    reduce_bucket: int = REDUCE_BUCKET    # DeepSpeed's zero_optimization.reduce_bucket_size (elements)
    sub_group: int = SUB_GROUP            # zero_optimization.sub_group_size (elements)
    prefetch: int = PREFETCH              # zero_optimization.stage3_prefetch_bucket_size (elements)

    @property
    def trainable(self) -> int:
        return self.shapes.n_params if self.trainable_params is None else int(self.trainable_params)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def sharded(self, n_bytes: int) -> int:
        """Bytes per rank of a tensor partitioned like the parameters (ZeRO-3: 1/world)."""
        return -(-int(n_bytes) // self.world) if self.zero_stage >= 3 else int(n_bytes)

    def with_(self, **kw) -> "PlanSpec":
        return replace(self, **kw)

    def optimizer_bytes(self, where: str = "device") -> int:
        """Bytes per rank in ``where`` (device | host) of what the trainable parameters cost beyond
        their weights: gradients, fp32 masters and moments (a frozen parameter saves them)."""
        return sum(c.bytes for c in finetune_components(self) if c.name in _PER_TRAINABLE and c.where == where)


@dataclass
class Component:
    name: str
    phase: str
    where: str            # device | host
    bytes: int
    note: str = ""
    source: str = "finetune"   # finetune | method

    def as_dict(self) -> dict:
        return {"name": self.name, "phase": self.phase, "where": self.where, "bytes": int(self.bytes),
                "gib": round(self.bytes / GIB, 3), "note": self.note, "source": self.source}


#: components that scale with the trainable parameters
_PER_TRAINABLE = ("gradients", "fp32 master weights", "fp32 gradient copy", "fp32 gradient accumulation",
                  "fp32 gradient of one optimizer sub-group", "AdamW moments (m, v)")


# ----------------------------------------------------------------------------- activations

def layer_activation_bytes(s: ModelShapes, tokens: int, b: int) -> int:
    """Bytes autograd saves for one decoder layer's backward (Hugging Face Llama-style block, SDPA
    attention without a T x T matrix):

    * each RMSNorm: its fp32 input (upcast) and its normalised output before and after the weight;
    * attention: q, k, v after RoPE (k, v repeated to every head when the kernel needs it), the
      attention output and its contiguous copy for ``o_proj``;
    * gated MLP: gate, up, act(gate) and act(gate) * up (four d_ff-wide tensors).
    """
    d, f = s.d_model, s.d_ff
    d_q = s.n_heads * s.head_dim
    kv = s.n_heads * s.head_dim if s.n_kv_heads != s.n_heads else s.n_kv_heads * s.head_dim
    norms = s.norms_per_layer * (4 * d + 2 * b * d)
    attn = b * (d_q + 2 * kv) + 2 * b * d_q + 4 * s.n_heads   # + log-sum-exp per head
    mlp = 4 * b * f
    return tokens * (norms + attn + mlp)


def activation_components(spec: PlanSpec, tokens: int | None = None, layers: int | None = None,
                          with_head: bool = True, label: str = "activations") -> list[Component]:
    """The saved activations of one micro-batch (``tokens``) through ``layers`` decoder layers and
    (``with_head``) the LM head and loss, at the start of the backward pass."""
    s, b = spec.shapes, spec.dtype_bytes
    n = spec.tokens if tokens is None else tokens
    L = s.n_layers if layers is None else layers
    per_layer = layer_activation_bytes(s, n, b)
    if spec.gradient_checkpointing:
        body = L * n * s.d_model * b + per_layer      # each layer's input, one layer recomputed
        note = f"gradient checkpointing: {L} layer inputs + one layer ({per_layer / GIB:.2f} GiB)"
    else:
        body = L * per_layer
        note = f"{L} layers x {per_layer / GIB:.3f} GiB, {n} tokens"
    out = [Component(f"{label}: decoder layers", "train", "device", body, note)]
    if with_head:
        # logits (model dtype), their fp32 copy and the log-softmax kept by cross-entropy, plus the
        # fp32 and model-dtype gradients of the logits when the backward starts
        head = n * s.vocab * (b + 4 + 4) + n * s.vocab * (4 + b) + n * s.d_model * (4 + 2 * b)
        out.append(Component(f"{label}: LM head and loss", "train", "device", head,
                             f"{n} x {s.vocab} logits: model dtype, fp32, log-softmax and their gradients"))
    return out


# ----------------------------------------------------------------------------- the fine-tune

def finetune_components(spec: PlanSpec) -> list[Component]:
    """Parameters, gradients, optimizer state and buffers of AdamW under DeepSpeed, per rank."""
    s, b, W, z = spec.shapes, spec.dtype_bytes, spec.world, spec.zero_stage
    P, T = s.n_params, spec.trainable
    mixed = b < 4
    comps: list[Component] = []

    def add(name, n_bytes, note="", where="device", phase="train"):
        if n_bytes:
            comps.append(Component(name, phase, where, int(n_bytes), note))

    def part(n: int, stage: int) -> int:   # partitioned over the ranks from ZeRO stage `stage` on
        return -(-n // W) if z >= stage else n

    off_opt = spec.offload_optimizer and z >= 1
    off_par = spec.offload_params and z >= 3
    # parameters in the training dtype
    add("parameters", part(P * b, 3), f"{P / 1e9:.3f}B x {b} B" + (f" / {W} ranks (ZeRO-3)" if z >= 3 else ""),
        where="host" if off_par else "device")
    if z >= 3:
        gathered = min(P, max(s.layer_params, s.embed_params, s.head_params) + spec.prefetch) * b
        add("gathered parameters (ZeRO-3)", gathered, "the largest module being computed + the prefetch bucket")
    # gradients in the training dtype
    if z >= 2:
        add("gradients", part(T * b, 2), f"partition of {T / 1e9:.3f}B x {b} B", where="host" if off_opt else "device")
    else:
        add("gradients", T * b, f"{T / 1e9:.3f}B x {b} B")
    bucket = min(T, REDUCE_BUCKET + s.largest_tensor if z == 0 else spec.reduce_bucket) * b
    add("gradient reduce bucket", bucket,
        "ZeRO-0 flattens up to 5e8 gradient elements per all-reduce" if z == 0 else
        f"reduce_bucket_size {spec.reduce_bucket:.0e} elements")
    where_opt = "host" if off_opt else "device"
    if mixed:
        add("fp32 master weights", part(T * 4, 1), "", where=where_opt)
        if z == 0:
            add("fp32 gradient copy", T * 4, "mixed-precision ZeRO-0 flattens every gradient to fp32 for the step")
        elif z == 1:
            add("fp32 gradient accumulation", T * 4, "DeepSpeed's bf16 ZeRO-1 optimizer keeps fp32 gradients of every parameter")
        else:
            add("fp32 gradient of one optimizer sub-group", min(part(T, 2), spec.sub_group) * 4,
                f"converted per sub_group_size ({spec.sub_group:.0e} elements) at the step", where=where_opt)
    add("AdamW moments (m, v)", part(T * 8, 1), "2 x 4 B per trainable parameter", where=where_opt)
    comps += activation_components(spec)
    return comps


def prepare_baseline(spec: PlanSpec) -> list[Component]:
    """What the device holds while a method builds its offline pieces: the full model, loaded
    before the DeepSpeed engine partitions it."""
    s = spec.shapes
    return [Component("parameters (full model, before DeepSpeed)", "prepare", "device", s.n_params * spec.dtype_bytes)]


def post_train_baseline(spec: PlanSpec) -> list[Component]:
    """After training: the full weights (gathered after ZeRO-3) and, conservatively, the optimizer
    state, which the loop does not free before ``post_train``."""
    s, b = spec.shapes, spec.dtype_bytes
    tune = {c.name: c for c in finetune_components(spec)}
    out = [Component("parameters (full weights after training)", "post_train", "device", s.n_params * b)]
    for name in ("fp32 master weights", "AdamW moments (m, v)"):
        if name in tune:
            c = tune[name]
            out.append(Component(name, "post_train", c.where, c.bytes, "still held until garbage-collected"))
    return out


@dataclass
class Plan:
    spec: PlanSpec
    components: list[Component] = field(default_factory=list)

    def total(self, phase: str, where: str = "device") -> int:
        """Bytes of ``phase`` held in ``where``; on a CPU run (one memory) device + host."""
        cs = [c for c in self.components if c.phase == phase]
        if self.spec.device == "cpu":
            return sum(c.bytes for c in cs) if where == "device" else 0
        return sum(c.bytes for c in cs if c.where == where)

    def peak(self, where: str = "device") -> tuple[str, int]:
        """(phase, bytes) of the largest phase."""
        return max(((p, self.total(p, where)) for p in PHASES), key=lambda t: t[1])


def build_plan(spec: PlanSpec, method_entries: dict[str, int] | None = None) -> Plan:
    """The fine-tune's components plus a method's ``planned_memory`` entries."""
    comps = finetune_components(spec)
    entries = {parse_key(k): int(v) for k, v in (method_entries or {}).items()}
    phases = {p for p, _, _ in entries}
    if "prepare" in phases:
        comps += prepare_baseline(spec)
    if "post_train" in phases:
        comps += post_train_baseline(spec)
    for (phase, where, name), n in entries.items():
        comps.append(Component(name, phase, where, n, source="method"))
    return Plan(spec, comps)
