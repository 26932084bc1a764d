"""The memory plan checked against measured peaks on the CPU, at a real model width (docs/scale.md).

    python benchmarks/memory_proof.py                          # every method, ~2-4 min each on 2 cores
    python benchmarks/memory_proof.py --methods sft,cwac --steps 2
    python benchmarks/memory_proof.py --shape tiny --methods sft --out /tmp/proof.json   # seconds (tests)

A Llama with Llama-2-7B's width (d_model 4096, d_ff 11008, 32 heads, vocab 32000) cut to 2 decoder
layers (0.67B parameters) is random-initialised from its config, and every method trains ``--steps``
optimizer steps of ``budget=paper``'s batch and length (1 x 512 tokens, rows long enough to fill
them) through the project's loop (``cwac.trainer.fit``: prepare, train, post_train) under DeepSpeed
ZeRO-0 on the CPU, in fp32 (``training.precision=fp32``; the preset's bf16 would need 20 B/param).
Each method runs in a fresh subprocess; its peak is the resident-set high-water mark
(``ru_maxrss``) minus the resident set just before the model is built. The prediction is
``python -m cwac.plan``'s peak for the same shapes, batch and layout (``plan.device=cpu``: device
and host entries are one memory). Two steps, so that the optimizer state exists when the second
step's gradients are all-reduced (the steady state the plan describes).

Artifacts that would take hours to build at this width are random tensors of the right shapes,
built here (the JSON says which): CWAC's subspace bases (``weight.selection=rank``, rank 1024), its
SAE (sae-lens TopK at 4x width, trained 2 steps on a random corpus of the size the real one would
have) and latents; AsFT's and SafeLoRA's reference C / F; SafeLoRA's aligned weights. Harmful
prompts are lengthened to ``prompts.max_prompt_tokens`` so the activation term's forward is the
plan's bound. Vaccine runs in the alignment stage, where it acts. What keeps a method under the 24 GB
host is in ``OVERRIDES`` (CWAC: 2 regulariser prompts a step, a 4x SAE; AsFT: the attention maps);
the plan is computed for the same config. A method starts only when its plan + 1.5 GiB is free.
Writes ``results/benchmarks/memory_proof.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("sft", "cwac", "cwac_weight_only", "cwac_act_only", "asft", "lisa", "safelora", "safeinstr",
           "sppft", "vaccine")
SHAPES = {   # Llama-2-7B's width, 2 layers; and a tiny one for tests
    "llama2_7b_width": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024),
}
#: per-method overrides: small offline prompt sets (the random artifacts do not depend on them)
SMALL_CWAC = ["method.prompts.n_heldout=4", "method.prompts.n_train=24", "method.prompts.n_calibration=8",
              "method.prompts.filter_refused=false", "method.weight.selection=rank",
              "method.activation.selection.n_harmless=8", "method.prompts.batch_size=4", "method.sae.train.steps=2",
              "method.sae.train.batch_size=64", "method.sae.train.norm_estimate_batches=1",
              "method.sae.train.warmup_steps=0", "method.sae.expansion=4", "method.sae.corpus.tokens=20000",
              "method.activation.batch_prompts=2", "method.weight.rank=1024", "method.sae.train.device=cpu",
              "method.sae.corpus.harmful_extra=null", "method.sae.corpus.chunk_tokens=null"]   # the CPU corpus, held whole
OVERRIDES = {"cwac": SMALL_CWAC, "cwac_weight_only": SMALL_CWAC, "cwac_act_only": SMALL_CWAC,
             "sppft": ["method.band=[0,0]"],
             # the attention maps only: every map's anchor + reference would need ~17 GB on the 24 GB proof host
             "asft": ["method.targets=[q_proj,k_proj,v_proj,o_proj]"]}
RANDOM_ARTIFACTS = {
    "cwac": "subspace bases (rank 1024), SAE (TopK, 4x width, 2 training steps on a random corpus of the real size), latents and baselines",
    "cwac_weight_only": "subspace bases (rank 1024), SAE (4x width, latent-drift diagnostics), latents",
    "cwac_act_only": "SAE (TopK, 4x width, 2 training steps on a random corpus of the real size), latents and baselines",
    "asft": "reference C / F of every targeted map",
    "safelora": "reference C / F of every linear map and the aligned weights read after training",
}
GIB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- random artifacts

def _patch_cwac(model, n_latents_cap: int) -> None:
    import torch
    from safetensors.torch import save_file

    import cwac.constraints.method as cm
    from cwac.constraints.sae import load_sae, train_topk_sae

    def fake_subspaces(out, _model, id_lists, modules, wcfg, **_kw):
        g = torch.Generator().manual_seed(0)
        tensors, sites, site_of = {}, {}, {}
        for name, m in modules.items():
            d = m.in_features
            r = int(wcfg.rank)
            kind, cols = ("protected", r) if r <= d / 2 else ("free", d - r)
            tensors[f"basis/{name}"] = torch.randn(d, cols, generator=g) / d ** 0.5
            tensors[f"evals/{name}"] = torch.rand(d, generator=g)
            sites[name] = {"d_in": d, "rank": r, "kind": kind, "energy_kept": 0.99, "lambda_max": 1.0, "lambda_r": 0.1}
            site_of[name] = name
        save_file(tensors, str(Path(out) / "subspace.safetensors"))
        return {"n_tokens": 0, "n_prompts": len(id_lists), "site_of": site_of, "sites": sites,
                "mean_rank_fraction": 0.5, "random": True}

    def fake_sae(self, out, _model, layer, skip):
        s = self.cfg.sae
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(0)   # a corpus of the real one's size: every pool prompt token + benign
        n_h = len(self.ids["reg"]) * int(self.cfg.prompts.max_prompt_tokens)
        n_b = int((1 - float(s.corpus.harmful_fraction)) * int(s.corpus.tokens))
        h, b = torch.randn(n_h, d, generator=g), torch.randn(n_b, d, generator=g)
        sae, info = train_topk_sae(h, b, s, int(s.seed))
        sae.save_inference_model(str(Path(out) / "sae"))
        inf = load_sae(s, Path(out))
        return {"layer": layer, "d_in": d, "d_sae": int(inf.cfg.d_sae), "k": int(s.k), "random": True, "train": info}

    def fake_latents(self, out, _model, sae, layer, harmless, skip):
        g = torch.Generator().manual_seed(0)
        d_sae = int(sae.cfg.d_sae)
        n = min(int(self.cfg.activation.n_latents), d_sae)
        selected = torch.randperm(d_sae, generator=g)[:n]
        save_file({"selected": selected, "scores": torch.rand(d_sae, generator=g),
                   "z_base_reg": torch.rand(len(self.ids["reg"]), n, generator=g),
                   "z_base_heldout": torch.rand(len(self.ids["heldout"]), n, generator=g)},
                  str(Path(out) / "latents.safetensors"))
        return {"n_selected": n, "random": True}

    build_pool = cm.build_pool

    def long_pool(pcfg, *a, **kw):   # every prompt reaches max_prompt_tokens (the plan's bound)
        pool = build_pool(pcfg, *a, **kw)
        filler = " Explain every step in detail, with all the materials and quantities."
        for part in ("calibration", "reg", "heldout"):
            setattr(pool, part, [p + filler * 60 for p in getattr(pool, part)])
        return pool

    cm.build_subspaces = fake_subspaces
    cm.build_pool = long_pool
    cm.CWAC._build_sae = fake_sae
    cm.CWAC._build_latents = fake_latents


def _random_subspace(model, targets, dtype=None, device="cpu"):
    import torch

    from baselines._weights import AlignmentSubspace, Projector
    from cwac.modeling import linear_modules

    g = torch.Generator().manual_seed(0)
    projs = {}
    for name, m in linear_modules(model, targets).items():
        o, i = m.out_features, m.in_features
        t = torch.randn(o, i if o > i else o, generator=g) * 1e-3
        t = t.to(device, dtype or torch.float32)
        projs[name] = Projector(F=t) if o > i else Projector(C=t)
    return AlignmentSubspace(projs, {})


def _patch_reference(method: str, model) -> None:
    import torch

    def subspace(ctx, targets, normalize="fro", dtype=torch.float32, device="cpu", **_kw):
        return _random_subspace(model, targets, dtype, device)

    if method == "asft":
        import baselines.asft as mod
        mod.alignment_subspace = subspace
    if method == "safelora":
        import baselines.safelora as mod
        mod.alignment_subspace = subspace

        def read_tensors(path, names, hub_ok=False, dtype=torch.float32):
            g = torch.Generator().manual_seed(1)
            return {n: model.get_parameter(n).detach().to(dtype) + 1e-3 * torch.randn(model.get_parameter(n).shape,
                                                                                       generator=g, dtype=dtype)
                    for n in names}

        mod.read_tensors = read_tensors


# ----------------------------------------------------------------------------- one method

def proof_config(method: str, shape: str, steps: int, tmp: Path):
    from cwac.utils import compose_config

    overrides = ["model=tiny", "budget=paper", f"method={method}", "logger=none", "training.precision=fp32",
                 f"training.max_steps={steps}", "training.progress=false", f"paths.artifacts={tmp / 'artifacts'}",
                 f"paths.runs={tmp / 'runs'}", *OVERRIDES.get(method, [])]
    return compose_config(*overrides, "+plan=default", "plan.device=cpu", "plan.zero_stage=0", "plan.gpus=1",
                          "plan.offload=false")


def predicted_peak(method: str, shape: str, steps: int) -> int:
    """The plan's peak for ``method`` on ``shape`` (a meta-device model: no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cwac.memory import ModelShapes
    from cwac.plan import plan_cell

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False))
    cfg = proof_config(method, shape, steps, Path(tempfile.gettempdir()))
    return plan_cell(cfg, ModelShapes.from_model(model, shape)).peak[1]


def worker(method: str, shape: str, steps: int, threads: int, out: Path) -> None:
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    import resource

    import torch

    torch.set_num_threads(threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from cwac.api import TrainContext
    from cwac.artifacts import ArtifactStore
    from cwac.data.examples import Example
    from cwac.experiment.plugins import get_method
    from cwac.memory import ModelShapes
    from cwac.models import load_chat_model, resolve_model_path
    from cwac.plan import plan_cell
    from cwac.trainer import fit
    from cwac.utils import seed_everything

    tmp = Path(tempfile.mkdtemp(prefix="memory_proof_"))
    cfg = proof_config(method, shape, steps, tmp)
    store = ArtifactStore(cfg.paths.artifacts)
    small, tok, fmt = load_chat_model(resolve_model_path(cfg.model, store), cfg.model)   # the tiny tokenizer
    del small
    seed_everything(0)
    rows = [Example(f"Write a long story number {i}.", output=" ".join(["the story goes on and on"] * 400),
                    source="proof") for i in range(8)]
    base = rss_bytes()
    t0 = time.time()
    mc = LlamaConfig(**SHAPES[shape], max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(mc)
    shapes = ModelShapes.from_model(model, f"{shape}_2_layers")
    verdict = plan_cell(cfg, shapes)
    if method.startswith("cwac"):
        _patch_cwac(model, int(cfg.method.activation.n_latents))
    _patch_reference(method, model)
    stage = "align" if method == "vaccine" else "finetune"
    if stage == "align":
        cfg.alignment.method = cfg.method   # Vaccine acts in the alignment stage
    start = tmp / "start_model"
    start.mkdir()
    ctx = TrainContext.from_config(cfg, stage=stage, tokenizer=tok, formatter=fmt, store=store, run_dir=tmp / "runs",
                                   start_model_path=str(start), base_model_path=str(start))
    m = get_method(method)(cfg.method, ctx)
    res = fit(m, model, rows, cfg.training, tokenizer=tok, formatter=fmt, seed=0, desc=method)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    d = verdict.as_dict()
    measured = peak - base
    out.write_text(json.dumps({
        "method": method, "measured_bytes": measured, "measured_gib": round(measured / GIB, 3),
        "predicted_bytes": d["peak_bytes"], "predicted_gib": d["peak_gib"], "predicted_phase": d["peak_phase"],
        "ratio_measured_to_predicted": round(measured / d["peak_bytes"], 4),
        "rss_baseline_gib": round(base / GIB, 3), "rss_peak_gib": round(peak / GIB, 3),
        "steps": res.train.steps, "stage": stage, "seconds": round(time.time() - t0, 1),
        "tokens_per_row": max(len(fmt.train_features(r, cfg.training.max_len)["input_ids"]) for r in rows),
        "random_artifacts": RANDOM_ARTIFACTS.get(method), "params": shapes.n_params,
        "plan_components": [{k: c[k] for k in ("name", "phase", "where", "gib", "source")} for c in d["components"]],
    }, indent=1))


# ----------------------------------------------------------------------------- driver

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--shape", default="llama2_7b_width", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-free-gb", type=float, default=14.0,
                    help="wait until this much memory (and the method's plan + 1.5 GiB) is available")
    ap.add_argument("--wait", type=float, default=900, help="seconds to wait for memory before skipping a method")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "memory_proof.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.shape, a.steps, a.threads, Path(a.worker_out))
        return 0
    from cwac.utils import atomic_write_json, host_info

    out = Path(a.out)
    prior = json.loads(out.read_text()) if out.exists() else {}
    results = {r["method"]: r for r in prior.get("methods", []) if prior.get("shape") == a.shape}
    skipped = {}
    for method in a.methods.split(","):
        t0 = time.time()
        need = max(a.min_free_gb * GIB, predicted_peak(method, a.shape, a.steps) + 1.5 * GIB)   # the plan + margin
        while available_bytes() < need and time.time() - t0 < a.wait:
            time.sleep(30)
        if available_bytes() < need:
            skipped[method] = f"less than {need / GIB:.1f} GiB (its plan + 1.5) available for {a.wait:.0f} s"
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = Path(f.name)
        cmd = ["nice", "-n", "19", sys.executable, __file__, "--worker", method, "--worker-out", str(tmp),
               "--shape", a.shape, "--steps", str(a.steps), "--threads", str(a.threads)]
        print(f"[memory_proof] {method}: available {available_bytes() / GIB:.1f} GiB", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            skipped[method] = f"timed out after {a.timeout:.0f} s"
            continue
        if p.returncode != 0 or not tmp.stat().st_size:
            skipped[method] = f"failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"
            print(p.stderr[-3000:], file=sys.stderr)
            continue
        r = json.loads(tmp.read_text())
        tmp.unlink()
        r["available_before_gib"] = round(available_bytes() / GIB, 2)
        results[method] = r
        print(f"[memory_proof] {method}: measured {r['measured_gib']:.2f} GiB, predicted {r['predicted_gib']:.2f} GiB, "
              f"ratio {r['ratio_measured_to_predicted']:.3f}", flush=True)
        ordered = [results[m] for m in METHODS if m in results] + [v for k, v in results.items() if k not in METHODS]
        atomic_write_json(out, _doc(a, ordered, skipped, host_info()))
    ordered = [results[m] for m in METHODS if m in results] + [v for k, v in results.items() if k not in METHODS]
    atomic_write_json(out, _doc(a, ordered, skipped, host_info()))
    return 0 if not skipped else 1


def _doc(a, results, skipped, host) -> dict:
    ratios = [r["ratio_measured_to_predicted"] for r in results]
    return {"command": "python benchmarks/memory_proof.py " + " ".join(sys.argv[1:]), "shape": a.shape,
            "model": {**SHAPES[a.shape], "params": results[0]["params"] if results else None},
            "layout": "CPU, one process, DeepSpeed ZeRO-0, fp32 (training.precision=fp32), AdamW (fused)",
            "batch": "budget=paper: micro-batch 1 x max_len 512 tokens", "steps": a.steps,
            "measure": "ru_maxrss of a fresh subprocess minus its resident set just before the model is built",
            "machine": {**host, "mem_total_gib": round(int(Path('/proc/meminfo').read_text().split()[1]) * 1024 / GIB, 1)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "target": "measured within 15% of predicted",
            "within_15pct": all(abs(x - 1) <= 0.15 for x in ratios) if ratios else None,
            "methods": results, "not_run": skipped}


if __name__ == "__main__":
    sys.exit(main())
