"""Peak GPU memory and seconds per step of SFT, CWAC and AsFT on a random-initialised
Llama-3-8B-shaped model, beside the memory plan's prediction (docs/scale.md).

    python benchmarks/gpu_step.py                                  # one GPU, training/deepspeed=zero3_offload
    python benchmarks/gpu_step.py --preset zero3                   # ZeRO-3 without offload (a >= 141 GB GPU)
    python benchmarks/gpu_step.py --device cpu --shape tiny --steps 2 --out /tmp/gpu_step.json   # seconds (tests)

Needs torch, transformers, deepspeed and the project's own packages only: no registry, no hub, no
vLLM, no weights. The model (d_model 4096, d_ff 14336, 32 layers, 32 heads / 8 kv heads, vocab 128256)
is built from its config directly on the device in bf16 and trained ``--steps`` optimizer steps
(after ``--warmup`` untimed ones) at ``budget=paper``'s batch and length (1 x 512 tokens, rows that
fill them) through ``cwac.trainer.fit`` under the single-GPU DeepSpeed preset. CWAC's and AsFT's
artifacts are random tensors of the right shapes (``benchmarks/memory_proof.py`` builds them the
same way). Each method runs in a fresh process: its peak is ``torch.cuda.max_memory_allocated``
(on the CPU: the resident-set high-water mark above the process before the model). A step's time
is the wall time between the ends of consecutive optimizer steps (median). Writes
``results/benchmarks/gpu_step.json``. The budget is ~10 minutes on one H200 for the default run
(offloaded AdamW steps on the host dominate); ``--steps`` and ``--methods`` shorten it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
GIB = 1024 ** 3


def worker(method: str, a, out: Path) -> None:
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    if a.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import memory_proof as mp
    from cwac.api import TrainContext
    from cwac.artifacts import ArtifactStore
    from cwac.data.examples import Example
    from cwac.experiment.plugins import get_method
    from cwac.memory import ModelShapes
    from cwac.models import load_chat_model, resolve_model_path
    from cwac.plan import plan_cell
    from cwac.trainer import fit, to_device
    from cwac.utils import compose_config, seed_everything

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="gpu_step_"))
    overrides = ["model=tiny", "budget=paper", f"method={method}", "logger=none", f"training/deepspeed={a.preset}",
                 f"training.max_steps={a.steps + a.warmup}", "training.progress=false", f"paths.artifacts={tmp / 'a'}",
                 f"paths.runs={tmp / 'r'}", *[o for o in mp.OVERRIDES.get(method, []) if not o.startswith("method.targets")]]
    if method.startswith("cwac"):   # the paper's SAE width; bases at the plan's bound (rank d_ff / 2)
        overrides += [f"method.weight.rank={SHAPES[a.shape]['intermediate_size'] // 2}", "method.sae.expansion=16",
                      "method.sae.train.device=auto", "method.activation.batch_prompts=8"]
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80
    cfg = compose_config(*overrides, "+plan=default", f"plan.device={a.device}", "plan.gpus=1", f"plan.gpu_gb={gpu_gb:.1f}")
    store = ArtifactStore(cfg.paths.artifacts)
    _small, tok, fmt = load_chat_model(resolve_model_path(cfg.model, store), cfg.model)
    del _small
    seed_everything(0)
    rows = [Example(f"Write a long story number {i}.", output=" ".join(["the story goes on and on"] * 400), source="bench")
            for i in range(4 * (a.steps + a.warmup))]
    base = mp.rss_bytes()
    mc = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    t0 = time.time()
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM._from_config(mc, dtype=dtype)
    model = to_device(model)
    init_s = time.time() - t0
    shapes = ModelShapes.from_model(model, f"{a.shape}_random")
    verdict = plan_cell(cfg, shapes)
    if method.startswith("cwac"):
        mp._patch_cwac(model, int(cfg.method.activation.n_latents))
    mp._patch_reference(method, model)
    start = tmp / "start"
    start.mkdir()
    ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=store, run_dir=tmp / "r",
                                   start_model_path=str(start), base_model_path=str(start))
    m = get_method(method)(cfg.method, ctx)
    ends: list[float] = []
    after = m.after_step

    def timed_after_step(model_, step):
        out = after(model_, step)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return out

    m.after_step = timed_after_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = fit(m, model, rows, cfg.training, tokenizer=tok, formatter=fmt, seed=0, desc=method)
    steps = [b - e for e, b in zip(ends[a.warmup:], ends[a.warmup + 1:])]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    d = verdict.as_dict()
    out.write_text(json.dumps({
        "method": method, "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
        "peak_measure": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss above the process before the model",
        "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
        "seconds_per_step": round(statistics.median(steps), 3) if steps else None, "timed_steps": len(steps),
        "steps": res.train.steps, "init_seconds": round(init_s, 1), "prepare_seconds": round(res.prepare_seconds, 1),
        "predicted_gib": d["peak_gib"], "predicted_phase": d["peak_phase"], "predicted_host_gib": d["host_peak_gib"],
        "ratio_measured_to_predicted": round(peak / d["peak_bytes"], 4), "plan_layout": d["layout_text"],
        "params": shapes.n_params, "random_artifacts": mp.RANDOM_ARTIFACTS.get(method),
    }, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama3_8b", choices=sorted(SHAPES))
    ap.add_argument("--preset", default="zero3_offload", help="conf/training/deepspeed/<preset>.yaml")
    ap.add_argument("--methods", default="sft,cwac,asft")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=400, help="seconds per method")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu_step.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a, Path(a.worker_out))
        return 0
    from cwac.utils import atomic_write_json, host_info

    results, failed = [], {}
    t_all = time.time()
    for method in a.methods.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = Path(f.name)
        cmd = [sys.executable, __file__, "--worker", method, "--worker-out", str(tmp), "--device", a.device,
               "--shape", a.shape, "--preset", a.preset, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--threads", str(a.threads)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            failed[method] = f"timed out after {a.timeout:.0f} s"
            continue
        if p.returncode != 0 or not tmp.stat().st_size:
            failed[method] = f"rc {p.returncode}: " + "\n".join(p.stderr.strip().splitlines()[-5:])
            print(p.stderr[-4000:], file=sys.stderr)
            continue
        results.append(json.loads(tmp.read_text()))
        tmp.unlink()
        print(f"[gpu_step] {method}: {results[-1]['peak_gib']:.2f} GiB (plan {results[-1]['predicted_gib']:.2f}), "
              f"{results[-1]['seconds_per_step']} s/step", flush=True)
    doc = {"command": "python benchmarks/gpu_step.py " + " ".join(sys.argv[1:]), "device": a.device, "shape": a.shape,
           "model": SHAPES[a.shape], "preset": f"training/deepspeed={a.preset}", "budget": "paper (1 x 512 tokens)",
           "steps_timed": a.steps, "warmup": a.warmup, "machine": host_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "total_seconds": round(time.time() - t_all, 1), "methods": results, "failed": failed}
    atomic_write_json(a.out, doc)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
