"""Evaluation throughput: HF batched ``generate`` vs vLLM (the worker of ``eval/vllm_backend.py``).

    python benchmarks/eval_throughput.py                          # the organism when converted, else tiny
    python benchmarks/eval_throughput.py --model tiny --prompts 32 --max-new-tokens 64
    python benchmarks/eval_throughput.py --model-path artifacts/aligned/<key> --backends vllm --prompts 100 \
        --max-new-tokens 48 --vllm-env "VLLM_ENABLE_V1_MULTIPROCESSING=1 OMP_NUM_THREADS=" \
        --vllm-env "VLLM_ENABLE_V1_MULTIPROCESSING=1 OMP_NUM_THREADS= VLLM_CPU_OMP_THREADS_BIND=0-1" \
        --vllm-env default --out results/benchmarks/eval_vllm_cores.json   # how vLLM uses the CPU, A/B/C

Both backends greedily complete the same ``--prompts`` BeaverTails evaluation prompts (the HS
workload) through the project's backends, with the model's chat format. Generated tokens are
counted the same way for both (new token ids up to and including EOS,
``eval.backends.count_generated``), so tokens/s compare like with like; vLLM's one-off engine
start is reported apart and in an end-to-end figure.
Each ``--vllm-env`` is one vLLM backend: ``default`` (the project's worker environment,
``eval.vllm_backend.worker_env``) or space-separated ``KEY=VALUE`` pairs laid over it (``KEY=``
removes KEY, so vLLM's own default applies). Backends are interleaved ``--repeats`` times so
that load from other processes hits them alike (the load average is recorded). Writes ``results/benchmarks/eval_throughput_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def organism_path(artifacts: Path) -> Path | None:
    found = sorted(p.parent for p in (artifacts / "model_gguf").glob("*/config.json"))
    return found[0] if found else None


def tiny_path(artifacts: Path) -> str:
    from cwac.artifacts import ArtifactStore
    from cwac.models import resolve_model_path

    from cwac.utils import compose_config

    cfg = compose_config("model=tiny", f"paths.artifacts={artifacts}")
    return resolve_model_path(cfg.model, ArtifactStore(cfg.paths.artifacts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["auto", "organism", "tiny"], default="auto",
                    help="auto: the converted SmolLM2 organism (artifacts/model_gguf/*) when present, else tiny")
    ap.add_argument("--model-path", default=None,
                    help="any HF model folder instead of --model, e.g. artifacts/aligned/<key> (named by its folder)")
    ap.add_argument("--backends", default="hf,vllm", help="comma-separated subset of hf,vllm")
    ap.add_argument("--artifacts", default=os.environ.get("CWAC_ARTIFACTS", str(ROOT / "artifacts")))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="HF batch size (eval.batch_size)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for HF (default: torch's)")
    ap.add_argument("--vllm-env", action="append", default=None,
                    help="one vLLM backend: 'default' or 'KEY=VALUE ...' over it ('KEY=' unsets); repeatable")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)

    import torch

    from cwac.data.examples import Example
    from cwac.data.harmful import prompt_set
    from cwac.data.prompts import PromptFormatter
    from cwac.models import load_model
    from cwac.utils import host_info
    from eval.backends import HFBackend
    from eval.vllm_backend import VLLMBackend, probe

    if a.threads:
        torch.set_num_threads(a.threads)
    artifacts = Path(a.artifacts)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    envs = {}
    for spec in a.vllm_env or ["default"]:
        pairs = [] if spec.strip() == "default" else spec.split()
        if any("=" not in kv for kv in pairs):
            ap.error(f"--vllm-env {spec!r}: give 'default' or space-separated KEY=VALUE pairs")
        envs[spec.strip()] = dict(kv.split("=", 1) for kv in pairs)
    if not backends or set(backends) - {"hf", "vllm"}:
        ap.error(f"--backends must be a comma-separated subset of hf,vllm; got {a.backends!r}")
    if a.model_path:
        path = str(Path(a.model_path).resolve())
        if not (Path(path) / "config.json").exists():
            ap.error(f"--model-path {a.model_path}: no config.json there (an HF model folder is needed)")
        name = Path(path).name
    else:
        org = organism_path(artifacts)
        if a.model == "organism" and org is None:
            ap.error(f"no converted organism under {artifacts}/model_gguf; run any organism cell first")
        name = "smollm2_135m" if (a.model != "tiny" and org is not None) else "tiny"
        path = str(org) if name == "smollm2_135m" else tiny_path(artifacts)
    info = None
    if "vllm" in backends:
        info, why = probe()
        if info is None:
            print(why, file=sys.stderr)
            return 1

    model, tok = load_model(path)
    fmt = PromptFormatter(tok, "chat")
    examples = [Example(p) for p in list(prompt_set("beavertails_eval"))[: a.prompts]]

    # vLLM engines run one at a time (an idle engine's scheduler still polls a core), each started
    # afresh per repeat: its start-up is measured every time and charged to end-to-end throughput.
    env_of = {(f"vllm[{spec}]" if len(envs) > 1 else "vllm"): env for spec, env in envs.items()} \
        if "vllm" in backends else {}
    labels = (["hf"] if "hf" in backends else []) + list(env_of)
    hf = HFBackend(model, tok, fmt, batch_size=a.batch_size, progress=False) if "hf" in backends else None
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    answers: dict[str, list[str]] = {}
    backend_env: dict[str, dict] = {}
    for _ in range(a.repeats):
        for label in labels:
            init = None
            if label == "hf":
                backend = hf
            else:
                backend = VLLMBackend(path, tok, fmt, env=env_of[label])
                backend_env[label] = backend.worker_env_summary()
            try:
                if label != "hf":
                    t0 = time.time()
                    backend.generate(examples[:1], 4, desc="warm-up")   # starts the engine
                    init = round(time.time() - t0, 1)
                before = backend.generated_tokens
                t = time.time()
                out = backend.generate(examples, a.max_new_tokens, desc=label)
                secs = time.time() - t
            finally:
                if label != "hf":
                    backend.close()
            toks = backend.generated_tokens - before
            runs[label].append({"seconds": round(secs, 3), "tokens": toks, "tokens_per_s": round(toks / secs, 1),
                                "loadavg_1m": round(os.getloadavg()[0], 2), **({"init_seconds": init} if init else {})})
            answers[label] = out
            print(f"{label}: {toks} tokens in {secs:.1f} s = {toks / secs:.1f} tok/s"
                  + (f" (engine start {init:.1f} s)" if init else ""), flush=True)

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    result = {"benchmark": "eval_throughput", "model": name, "model_path": path, "prompts": len(examples),
              "max_new_tokens": a.max_new_tokens, "repeats": a.repeats}
    for label in labels:
        entry = {"runs": runs[label], "tokens_per_s": med(label, "tokens_per_s")}
        if label == "hf":
            entry.update(batch_size=a.batch_size, torch_threads=torch.get_num_threads())
        else:
            entry.update(init_seconds=med(label, "init_seconds"), version=info["vllm"], worker_env=backend_env[label],
                         end_to_end_tokens_per_s=round(med(label, "tokens") / (med(label, "seconds")
                                                                             + med(label, "init_seconds")), 1))
        result[label] = entry
    first = labels[0]
    for label in labels[1:]:
        same = sum(x == y for x, y in zip(answers[first], answers[label]))
        result[f"speedup_{label}_vs_{first}"] = round(med(label, "tokens_per_s") / med(first, "tokens_per_s"), 2)
        result[f"identical_answers_{label}_vs_{first}"] = f"{same}/{len(examples)}"
    result.update({"machine": {**host_info(), "torch": torch.__version__},
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "command": " ".join([Path(sys.executable).name, *sys.argv])})
    out = Path(a.out) if a.out else ROOT / "results" / "benchmarks" / f"eval_throughput_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k == "model" or k.startswith(("speedup", "identical"))}),
          "->", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
