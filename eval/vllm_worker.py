"""vLLM generation worker, run as a subprocess by ``eval/vllm_backend.py``.

It runs under the python of the venv that has vLLM (``make vllm-cpu`` -> ``.venv-vllm``; on a
GPU machine any python that can ``import vllm``), so it imports only the standard library and
vLLM: never ``cwac`` or ``eval`` (those live in ``.venv``, whose transformers/numpy pins differ
from vllm-cpu's; docs/environment.md §10).

Protocol (one JSON object per line):
  * ``--probe``: print ``{"vllm": version, "device": "cpu"|"cuda"|..., "archs": [...]}`` and exit.
  * ``--spec SPEC.json``: build one ``vllm.LLM`` from the spec (model folder, tokenizer folder,
    dtype, optional LoRA adapter), answer ``{"ready": true, ...}``, then serve requests read
    from stdin: ``{"cmd": "generate", "in": REQ.json, "out": RES.json}`` where REQ holds
    ``prompt_token_ids`` (lists of ints, formatted by the caller's PromptFormatter so vLLM and
    HF see identical prompts), ``max_tokens`` and ``stop_token_ids``; RES gets the generated
    ``token_ids`` (the caller decodes them with its own tokenizer). ``{"cmd": "exit"}`` ends.

Replies go to a private duplicate of the original stdout; fd 1 itself is pointed at stderr
before vLLM is imported, so vLLM's (and its spawned engine core's) prints cannot corrupt the
protocol. Decoding is greedy (temperature 0, one sample), as in the harmful-fine-tuning
literature's evaluation (docs/baselines.md, "Harmful score").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _protocol_stream():
    """A private handle on the original stdout; fd 1 (and so every child) now writes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _send(proto, obj: dict) -> None:
    proto.write(json.dumps(obj) + "\n")
    proto.flush()


def probe() -> dict:
    import vllm
    from vllm.model_executor.models import ModelRegistry
    from vllm.platforms import current_platform

    return {"vllm": vllm.__version__, "device": current_platform.device_type,
            "archs": sorted(ModelRegistry.get_supported_archs()), "python": sys.executable}


def build_llm(spec: dict):
    from vllm import LLM

    kwargs = dict(model=spec["model"], tokenizer=spec.get("tokenizer") or spec["model"], dtype=spec["dtype"],
                  seed=spec.get("seed", 0), enforce_eager=spec.get("enforce_eager", True),
                  generation_config="vllm",  # ignore the checkpoint's sampling defaults: the request decides
                  trust_remote_code=False,
                  # one device: the model runs inside the engine-core process (no third interpreter);
                  # on a CPU the parent also sets VLLM_ENABLE_V1_MULTIPROCESSING=0, which folds the engine
                  # core into this process (eval.vllm_backend.cpu_worker_defaults).
                  distributed_executor_backend=spec.get("executor") or "uni")
    if spec.get("max_model_len"):
        kwargs["max_model_len"] = int(spec["max_model_len"])
    if spec.get("gpu_memory_utilization"):
        kwargs["gpu_memory_utilization"] = float(spec["gpu_memory_utilization"])
    if spec.get("lora"):
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=int(spec["lora"]["max_rank"]))
    return LLM(**kwargs)


def generate(llm, spec: dict, req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(n=1, temperature=0.0, max_tokens=int(req["max_tokens"]),
                            stop_token_ids=list(req["stop_token_ids"]), detokenize=False,
                            skip_special_tokens=True)
    lora = None
    if spec.get("lora"):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, spec["lora"]["path"])
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompt_token_ids"]]
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason for o in outs], "seconds": time.time() - t0}


def serve(spec_path: str) -> int:
    proto = _protocol_stream()
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.time()
    try:
        llm = build_llm(spec)
        import vllm

        import torch

        # Read from the engine, not the environment: its core client is InprocClient when the engine
        # runs in this process, and then this process's torch threads are the model's.
        client = type(getattr(getattr(llm, "llm_engine", None), "engine_core", None)).__name__
        _send(proto, {"ready": True, "init_seconds": round(time.time() - t0, 2), "vllm": vllm.__version__,
                      "torch_threads": torch.get_num_threads(), "engine_in_process": client == "InprocClient"})
    except BaseException:
        _send(proto, {"ready": False, "error": traceback.format_exc()})
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "exit":
            break
        try:
            with open(msg["in"]) as f:
                req = json.load(f)
            res = generate(llm, spec, req)
            with open(msg["out"], "w") as f:
                json.dump(res, f)
            _send(proto, {"ok": True, "out": msg["out"]})
        except BaseException:
            _send(proto, {"ok": False, "error": traceback.format_exc()})
    _send(proto, {"bye": True})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--spec")
    a = ap.parse_args()
    if a.probe:
        proto = _protocol_stream()
        try:
            _send(proto, {"ok": True, **probe()})
        except BaseException as e:
            _send(proto, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            return 1
        return 0
    if not a.spec:
        ap.error("--spec or --probe is required")
    return serve(a.spec)


if __name__ == "__main__":  # the engine core is a spawned process: keep the guard (docs/environment.md §10)
    sys.exit(main())
