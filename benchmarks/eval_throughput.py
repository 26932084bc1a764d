"""Evaluation throughput: HF batched ``generate`` vs vLLM (the worker of ``eval/vllm_backend.py``).

    python benchmarks/eval_throughput.py                          # the organism when converted, else tiny
    python benchmarks/eval_throughput.py --model tiny --prompts 32 --max-new-tokens 64
    python benchmarks/eval_throughput.py --vllm-bind 0-1          # let vLLM use both cores

Both backends greedily complete the same ``--prompts`` BeaverTails evaluation prompts (the HS
workload) through the project's backends, with the model's chat format. Generated tokens are
counted the same way for both (new token ids up to and including EOS,
``eval.backends.count_generated``), so tokens/s compare like with like; vLLM's one-off engine
start is reported apart and in an end-to-end figure.
Backends are interleaved ``--repeats`` times so that load from other processes hits both alike
(the load average is recorded). Writes ``results/benchmarks/eval_throughput_<model>.json``.
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
    ap.add_argument("--artifacts", default=os.environ.get("CWAC_ARTIFACTS", str(ROOT / "artifacts")))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="HF batch size (eval.batch_size)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for HF (default: torch's)")
    ap.add_argument("--vllm-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: vLLM's auto)")
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
    org = organism_path(artifacts)
    if a.model == "organism" and org is None:
        ap.error(f"no converted organism under {artifacts}/model_gguf; run any organism cell first")
    name = "smollm2_135m" if (a.model != "tiny" and org is not None) else "tiny"
    path = str(org) if name == "smollm2_135m" else tiny_path(artifacts)
    info, why = probe()
    if info is None:
        print(why, file=sys.stderr)
        return 1

    model, tok = load_model(path)
    fmt = PromptFormatter(tok, "chat")
    examples = [Example(p) for p in list(prompt_set("beavertails_eval"))[: a.prompts]]

    env = {"VLLM_CPU_OMP_THREADS_BIND": a.vllm_bind} if a.vllm_bind else {}
    vllm = VLLMBackend(path, tok, fmt, env=env)
    t0 = time.time()
    vllm.generate(examples[:1], 4, desc="warm-up")   # starts the engine
    init_s = time.time() - t0
    hf = HFBackend(model, tok, fmt, batch_size=a.batch_size, progress=False)
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    answers: dict[str, list[str]] = {}
    try:
        for _ in range(a.repeats):
            for label, backend in (("hf", hf), ("vllm", vllm)):
                before = backend.generated_tokens
                t = time.time()
                out = backend.generate(examples, a.max_new_tokens, desc=label)
                secs = time.time() - t
                toks = backend.generated_tokens - before
                runs[label].append({"seconds": round(secs, 3), "tokens": toks, "tokens_per_s": round(toks / secs, 1),
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
                answers[label] = out
                print(f"{label}: {toks} tokens in {secs:.1f} s = {toks / secs:.1f} tok/s", flush=True)
    finally:
        vllm.close()

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    same = sum(x == y for x, y in zip(answers["hf"], answers["vllm"]))
    result = {
        "benchmark": "eval_throughput", "model": name, "model_path": path, "prompts": len(examples),
        "max_new_tokens": a.max_new_tokens, "hf_batch_size": a.batch_size, "repeats": a.repeats,
        "hf": {"runs": runs["hf"], "tokens_per_s": med("hf", "tokens_per_s"), "torch_threads": torch.get_num_threads()},
        "vllm": {"runs": runs["vllm"], "tokens_per_s": med("vllm", "tokens_per_s"), "init_seconds": round(init_s, 1),
                 "end_to_end_tokens_per_s": round(med("vllm", "tokens") / (med("vllm", "seconds") + init_s), 1),
                 "version": info["vllm"], "omp_threads_bind": a.vllm_bind or "auto"},
        "speedup": round(med("vllm", "tokens_per_s") / med("hf", "tokens_per_s"), 2),
        "identical_answers": f"{same}/{len(examples)}",
        "machine": {**host_info(), "torch": torch.__version__},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = Path(a.out) if a.out else ROOT / "results" / "benchmarks" / f"eval_throughput_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "speedup", "identical_answers")}), "->", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
