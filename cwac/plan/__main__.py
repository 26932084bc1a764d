"""``python -m cwac.plan [overrides...] [--json] [--matrix [--out FILE] [--markdown FILE]]`` (docs/scale.md).

One cell: Hydra overrides as for ``run.py`` plus ``plan.*`` (``conf/plan/default.yaml``); prints the
table of components, the phase totals and whether it fits (``--json``: the same as JSON).
``--matrix``: every registered method x the paper's models under ``budget=paper`` on the two
paper layouts (8 x 80 GB ZeRO-3; 1 x 80 GB ZeRO-3 with the optimizer offloaded), as JSON and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys

from cwac.memory import GIB

PAPER_MODELS = ("llama2_7b_chat", "llama3_8b_instruct", "mistral_7b_instruct", "gemma2_9b_it")
PAPER_LAYOUTS = {   # the DeepSpeed presets of conf/training/deepspeed/ (docs/zero3.md)
    "8x80GB ZeRO-3": ["training/deepspeed=zero3", "plan.gpus=8", "plan.gpu_gb=80"],
    "1x80GB ZeRO-3 + offload": ["training/deepspeed=zero3_offload", "plan.gpus=1", "plan.gpu_gb=80"],
}


def compose(overrides: list[str]):
    from cwac.utils import compose_config

    return compose_config("+plan=default", *overrides)


def gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def table(v) -> str:
    d = v.as_dict()
    s = v.plan.spec
    lines = [f"memory plan: {d['model']} x {d['method']}  ({v.layout.describe()})",
             f"  {s.shapes.n_params / 1e9:.3f}B parameters ({s.trainable / 1e9:.3f}B trainable), "
             f"{s.dtype_bytes} B/element, micro-batch {s.micro_batch} x {s.seq_len} tokens",
             "", f"  {'phase':<11}{'where':<8}{'GiB/rank':>9}  component"]
    for c in v.plan.components:
        lines.append(f"  {c.phase:<11}{c.where:<8}{gib(c.bytes):>9}  {c.name}{' [method]' if c.source == 'method' else ''}"
                     + (f"  ({c.note})" if c.note else ""))
    lines.append("")
    for p, t in d["totals"].items():
        if t["device_gib"] or t["host_gib"]:
            lines.append(f"  total {p:<11} device {t['device_gib']:8.2f} GiB   host {t['host_gib']:8.2f} GiB")
    lines.append(f"  peak: {d['peak_gib']:.2f} GiB per {'process' if s.device == 'cpu' else 'GPU'} ({d['peak_phase']}); "
                 f"budget {d['budget_gib']:.2f} GiB ({v.layout.gpu_gb:g} - {v.layout.reserve_gb:g} reserve); host peak "
                 f"{d['host_peak_gib']:.2f} GiB per node ({d['host_peak_phase']})")
    lines.append(f"  FITS (margin {d['margin_gib']:.2f} GiB)" if v.fits else
                 f"  DOES NOT FIT: {-d['margin_gib']:.2f} GiB over" if d["margin_gib"] < 0 else
                 f"  DOES NOT FIT: host memory {d['host_peak_gib']:.2f} GiB > plan.host_gb={v.layout.host_gb:g}")
    return "\n".join(lines)


def refuses_zero3(method: str, overrides: list[str]) -> bool:
    """Whether ``method``'s alignment stage refuses the ZeRO-3 layout of ``overrides`` and takes ZeRO-2
    (its own ``check_config``, as pre-flight calls it; alignment-stage defences that perturb or read
    whole parameters do), so that the matrix plans such a stage at ZeRO-2 on the same GPUs."""
    from cwac.api import METHODS
    from cwac.schema import ConfigError

    cls = METHODS.get(method)

    def refused(extra: list[str]) -> bool:
        cfg = compose([f"method@alignment.method={method}", *overrides, *extra])
        try:
            cls.check_config(cfg.alignment.method, cfg, "alignment.method", "align")
        except ConfigError:
            return True
        return False

    return refused([]) and not refused(["training.zero_stage=2"])


def matrix(extra: list[str], methods: list[str] | None = None) -> dict:
    from cwac.api import METHODS
    from cwac.experiment import plugins  # noqa: F401  (registers the methods)
    from cwac.plan import model_shapes, plan_cell

    from cwac.api import Method
    from cwac.utils import CONF_DIR

    yamls = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    methods = list(methods or [m for m in METHODS.names() if m in yamls])
    own = {m: METHODS.get(m).planned_memory.__func__ is not Method.planned_memory.__func__ for m in methods}
    rows, zero2s = [], {}
    for model in PAPER_MODELS:
        shapes = model_shapes(compose([f"model={model}", "budget=paper", *extra]))
        for method in methods:
            for name, lay in PAPER_LAYOUTS.items():
                ov = [f"model={model}", f"method={method}", "budget=paper", *lay, *extra]
                if (method, name) not in zero2s:   # the same for every model
                    zero2s[(method, name)] = refuses_zero3(method, ov)
                zero2 = zero2s[(method, name)]
                v = plan_cell(compose(ov + ["plan.zero_stage=2"] if zero2 else ov), shapes)
                d = v.as_dict()
                rows.append({"model": model, "method": method, "layout": name, "zero_stage": 2 if zero2 else 3,
                             "fits": d["fits"],
                             "peak_gib": d["peak_gib"], "peak_phase": d["peak_phase"], "margin_gib": d["margin_gib"],
                             "host_peak_gib": d["host_peak_gib"], "budget_gib": d["budget_gib"],
                             "params_b": round(shapes.n_params / 1e9, 3),
                             "method_gib": round(sum(c.bytes for c in v.plan.components
                                                     if c.source == "method" and c.phase == d["peak_phase"]
                                                     and c.where == "device") / GIB, 3)})
    return {"command": "python -m cwac.plan --matrix " + " ".join(extra), "budget": "paper",
            "layouts": PAPER_LAYOUTS, "methods_stating_own_tensors": own,
            "note": "a method whose planned_memory is the base class's is planned as SFT (nothing of its own); a "
                    "method whose alignment stage refuses ZeRO-3 (its check_config) is planned at ZeRO-2 on the "
                    "layout's GPUs (zero_stage 2 in its rows)",
            "rows": rows, "all_fit": all(r["fits"] for r in rows)}


def markdown(m: dict) -> str:
    layouts = list(m["layouts"])
    head = "| model | method | " + " | ".join(f"{l}: peak GiB/GPU (margin)" for l in layouts) + " | host GiB (offload) |"
    out = [head, "|" + "---|" * (3 + len(layouts))]
    by = {(r["model"], r["method"], r["layout"]): r for r in m["rows"]}
    for model in dict.fromkeys(r["model"] for r in m["rows"]):
        for method in dict.fromkeys(r["method"] for r in m["rows"]):
            cells = []
            for l in layouts:
                r = by[(model, method, l)]
                mark = "" if r["fits"] else " **does not fit**"
                stage = " at ZeRO-2" if r.get("zero_stage", 3) != 3 else ""
                cells.append(f"{r['peak_gib']:.1f} ({r['margin_gib']:+.1f}){stage}{mark}")
            host = by[(model, method, layouts[-1])]["host_peak_gib"]
            out.append(f"| {model} | {method} | " + " | ".join(cells) + f" | {host:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwac.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama3_8b_instruct method=cwac budget=paper")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--matrix", action="store_true", help="every method x paper model on the paper layouts")
    ap.add_argument("--methods", help="--matrix: comma-separated methods (default: every method with a conf/method YAML)")
    ap.add_argument("--out", help="--matrix: write the JSON here")
    ap.add_argument("--markdown", help="--matrix: write the markdown table here")
    a = ap.parse_args(argv)
    if a.matrix:
        m = matrix(a.overrides, a.methods.split(",") if a.methods else None)
        m["command"] = "python -m cwac.plan " + " ".join(sys.argv[1:] if argv is None else argv)
        if a.out:
            from cwac.utils import atomic_write_json

            atomic_write_json(a.out, m)
        md = markdown(m)
        if a.markdown:
            from pathlib import Path

            Path(a.markdown).write_text(md + "\n")
        print(json.dumps(m, indent=1) if a.json else md)
        return 0 if m["all_fit"] else 1
    from cwac.plan import plan_cell

    v = plan_cell(compose(a.overrides))
    print(json.dumps(v.as_dict(), indent=1) if a.json else table(v))
    return 0 if v.fits else 1


if __name__ == "__main__":
    sys.exit(main())
