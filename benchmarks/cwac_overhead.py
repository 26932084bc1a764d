"""CWAC overhead: training-step time of CWAC (and its parts) against SFT in one process, plus the
one-off cost of the offline pieces (refusal filter, subspace, SAE, latents).

    python benchmarks/cwac_overhead.py                       # tiny Llama (seconds)
    python benchmarks/cwac_overhead.py --model smollm2_135m  # the organism (minutes; needs the
                                                             # aligned artifact under --artifacts)
    python benchmarks/cwac_overhead.py --threads 1 --steps 40 --repeats 2
    python benchmarks/cwac_overhead.py --model smollm2_135m --configs sft,sft_before,sft_loop_adamw,sft_full_head \
        --steps 12 --repeats 2 --out results/benchmarks/train_step   # the loop's speed-ups, A/B
    python benchmarks/cwac_overhead.py --model smollm2_135m --configs sft,sft_bf16 --steps 12 --repeats 2 \
        --out results/benchmarks/train_step_bf16                     # bf16 training on this CPU, A/B

The paper reports ~44-46 min per epoch for CWAC vs ~42 min for SFT on Llama-2-7B (< 10%
overhead) and ~18 min (SVD) + ~6.5 h (SAE) one-off (docs/method.md §5, §8). Every configuration
trains the same rows from a fresh copy of the start model through the project's DeepSpeed loop
(``cwac.trainer.train``); a step's time is the wall time between the ends of consecutive
optimizer steps (forward, backward, step and the method's ``after_step``), warm-up steps
dropped, median over the rest. Configurations are interleaved ``--repeats`` times so that load
from other processes hits all of them alike. CWAC's offline pieces are reused from ``--artifacts``
(any organism CWAC cell builds them; built there once when missing); ``--fresh-artifacts`` builds
them in a temporary folder to measure their one-off cost. The JSON holds each configuration's
median step and its ratio to SFT's, a breakdown of CWAC's extra cost by difference (activation
term, weight projection, diagnostics) and packed / padded step ratios (fine-tuning, CWAC, the
alignment stage). Writes ``results/benchmarks/cwac_overhead_<model>.json``.

    python benchmarks/cwac_overhead.py --model smollm2_135m --threads 2 --steps 12 --repeats 2 \
        --configs sft,sft_padded,cwac,cwac_padded,cwac_nodiag,cwac_weight_only,cwac_act_only,align,align_padded
    python benchmarks/cwac_overhead.py --model smollm2_135m --threads 2 --steps 4 --warmup 1 --repeats 1 \
        --configs align,align_vaccine,align_tvaccine,align_booster,align_repnoise \
        --out results/benchmarks/align_defences   # an alignment-stage defence's build, a step against ours

Every configuration runs with the config's ``host_allocator`` (``retain`` by default; the
``_glibc`` configurations switch back to glibc's malloc start values within the process). To
measure with glibc's malloc untouched, run a whole process with the override
``host_allocator=glibc``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (method, extra overrides). Under budget=cpu training.packing is on (packed batches, and
# CWAC's regulariser prompts packed with the template's shared start once); "_padded" turns it off.
CONFIGS = {
    "sft": ("sft", []),
    "sft_padded": ("sft", ["training.packing=false"]),
    "cwac": ("cwac", []),
    "cwac_padded": ("cwac", ["training.packing=false"]),
    "cwac_nodiag": ("cwac", ["method.diagnostics.grad_norm_every=0", "method.diagnostics.leak_every=0"]),
    "cwac_weight_only": ("cwac_weight_only", []),
    "cwac_act_only": ("cwac_act_only", []),
    "cwac_update": ("cwac", ["method.weight.mode=update"]),
    "cwac_weight_only_update": ("cwac_weight_only", ["method.weight.mode=update"]),
    "cwac_all_linear_update": ("cwac", ["method.weight.targets=all", "method.weight.mode=update"]),
    # the alignment stage's step (its rows and training node), packed and padded
    "align": ("sft", []),
    "align_padded": ("sft", ["training.packing=false"]),
    # the alignment stage's step with an alignment-stage defence as its method (what its own aligned
    # artifact costs a step, against "align"); "sft" here names the fine-tuning method, unused
    "align_vaccine": ("sft", ["method@alignment.method=vaccine"]),
    "align_tvaccine": ("sft", ["method@alignment.method=tvaccine"]),
    "align_booster": ("sft", ["method@alignment.method=booster"]),
    "align_repnoise": ("sft", ["method@alignment.method=repnoise"]),
    # the training step before 2026-11-29 (A/B of the loop's own speed-ups, on SFT)
    "sft_loop_adamw": ("sft", ["training.fused_adamw=false"]),
    "sft_full_head": ("sft", []),
    "sft_before": ("sft", ["training.fused_adamw=false"]),
    # bf16 weights and activations, fp32 master weights in DeepSpeed's optimizer (a candidate lever)
    "sft_bf16": ("sft", ["training.precision=bf16"]),
    # glibc's malloc start values instead of host_allocator=retain (cwac/host_allocator.py), in this
    # process; a whole run with the override host_allocator=glibc leaves glibc untouched instead
    "sft_glibc": ("sft", ["host_allocator=glibc"]),
    "cwac_glibc": ("cwac", ["host_allocator=glibc"]),
    # a cheaper regulariser (a method change, reported beside the paper's default B = 8)
    "cwac_b4": ("cwac", ["method.activation.batch_prompts=4"]),
    # the same projection computed on the maps' inputs (cwac/constraints/input_projection.py)
    "cwac_input": ("cwac", ["method.weight.project_at=input"]),
    "cwac_weight_only_input": ("cwac_weight_only", ["method.weight.project_at=input"]),
}
DEFAULT_CONFIGS = "sft,sft_padded,cwac,cwac_padded,cwac_nodiag,cwac_weight_only,cwac_act_only"
ALIGN_CONFIGS = ("align", "align_padded", "align_vaccine", "align_tvaccine", "align_booster", "align_repnoise")


def _full_head_loss(self, model, batch):
    """The task loss with the LM head over every position, as before ``response_loss``."""
    from cwac.losses import sequence_mean_ce

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_mean_ce(out.logits, batch["labels"], self.loss_reduction)


TASK_LOSS = {"sft_full_head": _full_head_loss, "sft_before": _full_head_loss}  # name -> replaced task_loss
BUDGET = {"tiny": "smoke", "smollm2_135m": "cpu"}


def compose(overrides: list[str]):
    from cwac.utils import compose_config

    return compose_config(*overrides)


def time_config(name: str, method_name: str, extra: list[str], args, model_path: str, bench_store, rows_cache: dict):
    """Per-step seconds of one configuration (after warm-up) and, for CWAC, its prepare info."""
    import torch
    from omegaconf import OmegaConf

    from cwac.api import TrainContext
    from cwac.data.mix import build_finetune_mix
    from cwac.experiment.plugins import get_method
    from cwac.host_allocator import set_host_allocator
    from cwac.models import load_chat_model
    from cwac.trainer import fit

    steps = args.warmup + args.steps
    cfg = compose([f"model={args.model}", f"budget={BUDGET[args.model]}", "logger=none", f"method={method_name}",
                   f"training.max_steps={steps}", "training.epochs=100", "training.progress=false",
                   *args.override, *extra])
    set_host_allocator(cfg.host_allocator)
    model, tok, fmt = load_chat_model(model_path, cfg.model)
    tc = cfg.training
    if name in ALIGN_CONFIGS:   # the alignment stage's rows and training node
        from cwac.alignment import alignment_rows, alignment_training

        tc = OmegaConf.merge(alignment_training(cfg), {"max_steps": steps, "epochs": 100, "progress": False})
        if "align_rows" not in rows_cache:
            rows_cache["align_rows"] = alignment_rows(cfg.alignment, cfg.alignment.seed)
        rows = rows_cache["align_rows"]
    else:
        if "rows" not in rows_cache:
            rows_cache["rows"] = build_finetune_mix(cfg.task.name, cfg.harmful.n_total, cfg.harmful.ratio, cfg.seed)
        rows = rows_cache["rows"]
    stage, node = ("align", cfg.alignment.method) if name in ALIGN_CONFIGS else ("finetune", cfg.method)
    ctx = TrainContext.from_config(cfg, stage=stage, tokenizer=tok, formatter=fmt, store=bench_store,
                                   run_dir=Path(args.tmp), start_model_path=model_path)
    method = get_method(node.name)(node, ctx)
    if name in TASK_LOSS:
        method.task_loss = types.MethodType(TASK_LOSS[name], method)
    marks: list[float] = []
    inner = method.after_step

    def timed_after_step(m, step):
        out = inner(m, step)
        marks.append(time.perf_counter())
        return out

    method.after_step = timed_after_step
    torch.manual_seed(cfg.seed)
    res = fit(method, model, rows, tc, tokenizer=tok, formatter=fmt, seed=cfg.seed, desc=name)
    prepare_s = res.prepare_seconds
    per_step = [b - a for a, b in zip(marks, marks[1:])][max(0, args.warmup - 1):]
    info = method.record_info() if hasattr(method, "info") else {}
    return per_step, prepare_s, info, f"{stage}:{node.name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(BUDGET))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration and repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a loaded 2-core box)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--fresh-artifacts", action="store_true",
                    help="build CWAC's offline pieces in a temporary store (measures their one-off cost) instead of "
                         "reusing the ones under --artifacts (built by any organism CWAC cell)")
    ap.add_argument("--artifacts", default=os.environ.get("CWAC_ARTIFACTS", str(ROOT / "artifacts")),
                    help="where the start model (tiny / aligned organism) lives")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for every configuration")
    args = ap.parse_args()

    from cwac.utils import OFFLINE_ENV, host_info

    for k, v in {**OFFLINE_ENV, "WANDB_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cwac.artifacts import ArtifactStore
    from cwac.experiment.align import start_model

    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; valid: {', '.join(CONFIGS)}")
    base = compose([f"model={args.model}", f"budget={BUDGET[args.model]}", "logger=none", *args.override])
    model_path, _ = start_model(base, ArtifactStore(args.artifacts), build=False)   # never trains the alignment stage
    with tempfile.TemporaryDirectory(prefix="cwac_bench_") as tmp:
        args.tmp = tmp
        bench_store = ArtifactStore(Path(tmp) / "artifacts" if args.fresh_artifacts else args.artifacts)
        rows: dict = {}
        times: dict[str, list[float]] = {n: [] for n in names}
        first_prepare: dict[str, float] = {}
        infos: dict[str, dict] = {}
        ran: dict[str, str] = {}   # config -> "<stage>:<method>" that trained
        for r in range(args.repeats):
            for n in names:
                method_name, extra = CONFIGS[n]
                per_step, prep, info, ran[n] = time_config(n, method_name, extra, args, model_path, bench_store, rows)
                times[n] += per_step
                if r == 0:
                    first_prepare[n] = round(prep, 2)
                    infos[n] = info
                print(f"[repeat {r}] {n}: median step {statistics.median(per_step):.4f} s", flush=True)

    sft = statistics.median(times["sft"]) if "sft" in times else None
    result = {"model": args.model, "budget": BUDGET[args.model], "threads": torch.get_num_threads(),
              "steps_timed": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "micro_batch_size": compose([f"model={args.model}", f"budget={BUDGET[args.model]}", *args.override]).training.micro_batch_size,
              "configs": {}, "one_off": {}, "overrides": args.override,
              "machine": {**host_info(), "loadavg_at_end": os.getloadavg()},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
    for n in names:
        med = statistics.median(times[n])
        result["configs"][n] = {"method": CONFIGS[n][0], "overrides": CONFIGS[n][1], "ran": ran[n],
                                "median_step_s": round(med, 5),
                                "mean_step_s": round(statistics.mean(times[n]), 5), "n_steps": len(times[n]),
                                "ratio_vs_sft": round(med / sft, 3) if sft else None,
                                "overhead_vs_sft_pct": round(100 * (med / sft - 1), 1) if sft else None}
    med = {n: result["configs"][n]["median_step_s"] for n in names}

    def share(a: str, b: str) -> float | None:   # (a - b) as a fraction of SFT's step
        return round((med[a] - med[b]) / sft, 3) if sft and a in med and b in med else None

    result["breakdown_vs_sft_step"] = {    # by difference of configurations timed side by side
        "activation_term": share("cwac_act_only", "sft"), "weight_projection": share("cwac_weight_only", "sft"),
        "diagnostics": share("cwac", "cwac_nodiag"), "cwac_total": share("cwac", "sft")}
    result["host_allocator_retain_vs_glibc"] = {a: round(med[a] / med[b], 3) for a, b in
                                                (("sft", "sft_glibc"), ("cwac", "cwac_glibc")) if a in med and b in med}
    result["align_defence_vs_align"] = {n: round(med[n] / med["align"], 3) for n in names     # its build's cost a step
                                        if n in ALIGN_CONFIGS and n not in ("align", "align_padded") and "align" in med}
    result["packed_vs_padded"] = {a: round(med[a] / med[b], 3) for a, b in
                                  (("sft", "sft_padded"), ("cwac", "cwac_padded"), ("align", "align_padded"))
                                  if a in med and b in med}
    for n in names:  # one-off costs: the first configuration that built each artifact
        info = infos.get(n) or {}
        for part in ("subspace", "sae", "latents"):
            a = info.get(part)
            if a and not a.get("reused") and part not in result["one_off"]:
                result["one_off"][part] = {"build_seconds": a.get("build_seconds"), "built_by": n}
        if info.get("prompts", {}).get("refusal_artifact") and "refusal_filter" not in result["one_off"]:
            result["one_off"]["refusal_filter"] = {"prepare_pool_seconds": info["prepare_seconds"].get("pool"),
                                                   "built_by": n}
        if n != "sft" and info:
            result["configs"][n]["prepare_seconds_first"] = first_prepare[n]
            result["configs"][n]["rank_fraction_mean"] = info.get("subspace", {}).get("rank_fraction_mean")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cwac_overhead_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: c["overhead_vs_sft_pct"] for n, c in result["configs"].items()}),
          json.dumps(result["align_defence_vs_align"]) if result["align_defence_vs_align"] else "", "\nwrote", path)


if __name__ == "__main__":
    main()
