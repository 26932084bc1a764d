"""What each defence costs and what its own aligned model does, from the records only.

Two side tables of ``python -m cwac.reports.build``:

* ``aligned_markdown``: one row per aligned artifact with a complete ``stage=align`` record. It
  gives the artifact's own HS, over-refusal and zero-shot FA before any fine-tuning, its build time,
  and its seconds per step over the plain organism's build on the same host. An alignment-stage
  defence (Vaccine, T-Vaccine, Booster, RepNoise) builds its own artifact with the organism's recipe
  (same rows, epochs and batch), so that ratio is its price in organism builds.
  ``sweeps/queue.yaml``'s ``align_cost`` stands in for it until such a record exists.
* ``step_cost_markdown``: per model, task and method at the main ratio, the median fine-tuning
  seconds per step over the cells and its ratio to SFT's median on the same host (CPU, ISA flags,
  torch threads), and how many cores other processes kept busy meanwhile (``timings.other_cores``;
  records from before it existed do not say, so a ratio near 1 is a tie). Times are only compared
  within one host.

The denominators (the organism's build, SFT's step) may also come from ``references``: records
kept out of the tables (``results/history/``, e.g. the organism rebuilt on a second host) that are
still valid timings. They are never shown as rows.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from cwac.reports.collect import Result, build_of, node, stage_of
from cwac.reports.organism import organism_key, organism_name
from cwac.reports.tables import _order, host_label, pretty


def _host_key(host: dict | None) -> tuple:
    h = host or {}
    return (h.get("cpu"), tuple(h.get("isa") or ()), h.get("torch_threads"), h.get("gpu"))


def reference_records(roots) -> list[dict]:
    """Complete records under ``roots`` (searched recursively), for the denominators only."""
    out = []
    for root in roots:
        for f in sorted(Path(root).rglob("record.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("status") == "complete":
                out.append(rec)
    return out


def _aligned(records: list[dict]) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    for rec in records:
        cfg = rec.get("config") or {}
        art = (rec.get("info") or {}).get("alignment") or {}
        meta = art.get("meta") or {}
        steps, train_s = meta.get("steps"), meta.get("train_seconds")
        metrics = rec.get("metrics") or {}
        row = {"model": str(node(cfg, "model").get("name", "?")),
               "method": str(node(cfg, "alignment.method").get("name", "sft")),
               "artifact": str(art.get("hash", "?")), "organism": organism_key(rec),
               "task": str(node(cfg, "task").get("name", "?")),
               "hs": metrics.get("hs"), "hs_by_set": metrics.get("hs_by_set") or {},
               "over_refusal": metrics.get("over_refusal"), "fa": metrics.get("fa"),
               "build_seconds": art.get("build_seconds"), "steps": steps, "resumed": meta.get("resumed_from_step"),
               "s_per_step": train_s / steps if steps and train_s is not None else None,
               "host": art.get("host") or rec.get("host") or {}, "finished": str(rec.get("finished", "")),
               "build": (build_of(rec) or {}).get("id")}
        key = (row["artifact"], _host_key(row["host"]))
        if key not in rows or row["finished"] >= rows[key]["finished"]:
            rows[key] = row
    return rows


def aligned_rows(records: list[dict], references: list[dict] = ()) -> list[dict]:
    """One row per aligned artifact and build host (the newest complete align record of each), with
    its s/step over the plain organism's build on the same host (``vs_organism``)."""
    out = list(_aligned(records).values())
    pool = out + [r for k, r in _aligned([x for x in references if stage_of(x) == "align"]).items()
                  if k not in {(o["artifact"], _host_key(o["host"])) for o in out}]
    for r in out:   # the plain organism (SFT-aligned) built on the same host: the unit of build cost
        ref = [o for o in pool if o["method"] == "sft" and o["model"] == r["model"]
               and o["organism"] == r["organism"] and _host_key(o["host"]) == _host_key(r["host"])
               and o["s_per_step"]]
        r["vs_organism"] = r["s_per_step"] / ref[0]["s_per_step"] if ref and r["s_per_step"] else None
    order = {m: i for i, m in enumerate(_order("method", [r["method"] for r in out]))}
    return sorted(out, key=lambda r: (r["model"], r["method"] != "sft", order[r["method"]], r["finished"]))


def _num(v, fmt: str = ".1f") -> str:
    return "–" if v is None else format(v, fmt)


def _build_s(r: dict) -> str:
    """The build's seconds; a build that resumed from a checkpoint (``cwac.resume``) timed only its
    last process, so it says so (its s/step counts every process's training time)."""
    return _num(r["build_seconds"]) + ("" if r.get("resumed") is None else f" (last process; resumed at step {r['resumed']})")


def aligned_markdown(records: list[dict], references: list[dict] = (), results: list[Result] = ()) -> str | None:
    """The aligned-artifacts table (see the module docstring); None without align records. ``results``:
    the fine-tuning cells, counted per artifact as started from this record's build or from another."""
    rows = aligned_rows(records, references)
    if not rows:
        return None
    lines = ["### Aligned artifacts, before fine-tuning", "",
             "| Model | Alignment stage | organism | artifact | HS | HS by set | over-refusal | FA (zero-shot) "
             "| build s | steps | s/step | s/step ÷ organism's | build host | cells from this build |",
             "|:--|:--|:--|:--|--:|:--|--:|--:|--:|--:|--:|--:|:--|--:|"]
    for r in rows:
        label = "SFT (the organism's recipe)" if r["method"] == "sft" else pretty("method", r["method"])
        by_set = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["hs_by_set"].items())) or "–"
        fa = "–" if r["fa"] is None else f"{r['fa']:.1f} ({pretty('task', r['task'])})"
        lines.append(f"| {pretty('model', r['model'])} | {label} | {organism_name(r['organism'])} | `{r['artifact']}` "
                     f"| {_num(r['hs'])} | {by_set} | {_num(r['over_refusal'])} | {fa} | {_build_s(r)} "
                     f"| {_num(r['steps'], 'd')} | {_num(r['s_per_step'], '.2f')} | {_num(r['vs_organism'], '.2f')} "
                     f"| {host_label(r['host'])} | {_from_build(r, results)} |")
    lines += ["", "From each `stage=align` record (`python run.py stage=align method@alignment.method=<defence>`): "
              "the aligned model's own scores with the fine-tuned cells' judge and prompts, and its build "
              "(`info.alignment`: seconds, steps and the host it was built on). An alignment-stage defence uses "
              "the organism's recipe, so s/step ÷ organism's is its build cost in organism builds; it is shown "
              "only where the organism was built on the same host (CPU, ISA flags, torch threads), in this "
              "table or in `results/history/`. Cells from this build: of the fine-tuning cells that started from "
              "this artifact key, those that started from this very build (the same weights; "
              "`cwac.reports.builds`); the others started from another build of the same key, listed in "
              "\"Aligned artifacts whose cells came from more than one build\".", ""]
    return "\n".join(lines)


def _from_build(row: dict, results: list[Result]) -> str:
    """``3 of 5``: the cells of ``row``'s artifact that started from ``row``'s build."""
    of_key = [r.build["id"] for r in results if r.build and r.build["artifact"] == row["artifact"]]
    return f"{sum(i == row['build'] for i in of_key)} of {len(of_key)}" if of_key else "–"


def _sft_reference_steps(references: list[dict], main_p: float) -> dict[tuple, list[float]]:
    """s/step of the plain-SFT fine-tuning records in ``references`` at ``main_p``."""
    out: dict[tuple, list[float]] = defaultdict(list)
    for rec in references:
        cfg = rec.get("config") or {}
        sps = (rec.get("timings") or {}).get("seconds_per_step")
        if (stage_of(rec) != "finetune" or sps is None or node(cfg, "method").get("name") != "sft"
                or node(cfg, "alignment.method").get("name", "sft") != "sft"
                or abs(float(node(cfg, "harmful").get("ratio", -1)) - main_p) > 1e-9):
            continue
        out[(node(cfg, "model").get("name"), node(cfg, "task").get("name"), _host_key(rec.get("host")))].append(float(sps))
    return out


def step_cost_markdown(results: list[Result], main_p: float, references: list[dict] = ()) -> str | None:
    """Median fine-tuning s/step per method at ``main_p``, over SFT's on the same host (from the
    results, else from the references)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    others: dict[tuple, list[float]] = defaultdict(list)   # timings.other_cores, where recorded
    for r in results:
        sps = r.timings.get("seconds_per_step")
        if sps is not None and abs(r.p - main_p) < 1e-9:
            key = (r.model, r.task, _host_key(r.host), r.method)
            groups[key].append(float(sps))
            if r.timings.get("other_cores") is not None:
                others[key].append(float(r.timings["other_cores"]))
    if not groups:
        return None
    ref_sft = _sft_reference_steps(references, main_p)
    hosts = {k[2]: next(r.host for r in results if _host_key(r.host) == k[2]) for k in groups}
    lines = [f"### Fine-tuning step time against SFT at p = {main_p:g}", "",
             "| Model | Task | Method | host | cells | median s/step | ÷ SFT's | other cores |",
             "|:--|:--|:--|:--|--:|--:|--:|--:|"]
    for model, task, hk in sorted({k[:3] for k in groups}, key=lambda k: (k[0], k[1], host_label(hosts[k[2]]))):
        sft = groups.get((model, task, hk, "sft")) or ref_sft.get((model, task, hk))
        sft_med = statistics.median(sft) if sft else None
        for method in _order("method", [k[3] for k in groups if k[:3] == (model, task, hk)]):
            vals = groups[(model, task, hk, method)]
            med = statistics.median(vals)
            busy = others.get((model, task, hk, method))
            lines.append(f"| {pretty('model', model)} | {pretty('task', task)} | {pretty('method', method)} "
                         f"| {host_label(hosts[hk])} | {len(vals)} | {med:.2f} "
                         f"| {_num(med / sft_med if sft_med else None, '.2f')} "
                         f"| {_num(statistics.median(busy) if busy else None, '.1f')} |")
    lines += ["", "From each record's `timings.seconds_per_step` (the training loop only: no evaluation, no one-off "
              "preparation); SFT's median is from the same host's SFT cells, else from `results/history/`. A defence that acts in the alignment stage fine-tunes as plain SFT, so its ratio is ~1; "
              "its cost is its build (the aligned-artifacts table). *other cores*: the median, over the cells that "
              "recorded it (`timings.other_cores`), of the cores other processes kept busy during training "
              "(~1 beside a second single-threaded cell); compare step times only between rows that agree on it, "
              "and where it is missing treat ratios within ~0.2 of each other as ties.", ""]
    return "\n".join(lines)
