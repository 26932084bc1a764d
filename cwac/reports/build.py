"""Regenerate every table and plot from run records, in one command.

    python -m cwac.reports.build                          # reads runs/ and results/records/, writes results/
    python -m cwac.reports.build --runs runs /scratch/cwac/runs --out results
    python -m cwac.reports.build --main-p 0.2 --decimals 2 --ignore eval.batch_size

Reads every ``record.json`` under the runs folders (never W&B; by default ``runs/`` and the
committed archive ``results/records/``, written by ``python -m cwac.reports.archive``; a record in
both counts once), keeps the complete fine-tuning records, and writes

* ``results/tables/{main,ablation,generalisation,ratio-<model>-<task>,lr-<model>-<task>}[-s<setting>].{md,tex}``
  (each caption names the organism version and the seeds),
* ``results/plots/{hs_vs_p,fa_vs_hs}-<model>-<task>*.png`` and
  ``results/plots/curves-<model>-<task>-p<p>*.png``,
* ``results/tables/degenerate[-s<setting>].{md,tex}``: per method at the main ratio, the share of flagged HS
  answers that are empty, repeated or off-topic (``cwac.reports.degenerate``),
* ``results/tables/timings.md``: every cell's seconds per phase and the host it ran on,
* ``results/tables/{aligned,step_cost}.md``: each aligned artifact's own scores and build cost, and each
  method's fine-tuning step time over SFT's on the same host (``cwac.reports.costs``),
* ``results/tables/builds.md`` (only when it has rows): the aligned artifacts whose cells started from
  more than one build of the same key (``cwac.reports.builds``),
* ``results/claims.md`` and the "Claims" section of ``results/index.md``: the paper's four claims
  checked on the main setting's records (``cwac.reports.claims``),
* ``results/index.md``: every table, links to the plots, what is missing (failed and
  unfinished cells), the command and the date,
* ``sweeps/queue.md`` (when writing ``results/`` from the default folders): the cell queue and its
  progress (``cwac.reports.queue``).

Records whose configs differ beyond the table axes (another budget, judge, training
recipe, organism version) form separate *settings*; the largest one gets the plain file names, the
others a ``-s<hash>`` suffix and a caption saying how they differ. Within a setting, every table but
the learning-rate one keeps the records at the setting's most common learning rate. ``tables/`` and
``plots/`` are rewritten from scratch on every build.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from cwac.reports import plots
from cwac.reports.builds import builds_markdown
from cwac.reports.claims import check_claims, claims_markdown
from cwac.reports.collect import Coverage, Result, flatten, load_results, setting_diff, stage_of
from cwac.reports.costs import aligned_markdown, reference_records, step_cost_markdown
from cwac.reports.degenerate import degenerate_table
from cwac.reports.organism import organism_name
from cwac.reports.tables import (ABLATION, ABLATION_ONLY, GENERALISATION, Table, generalisation_table, lr_table,
                                 pretty, ratio_table, task_table, timings_markdown, to_latex, to_markdown)


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", s).strip("_")


def describe_organism(rs: list[Result]) -> str:
    """Caption text naming the organism version of each model in a table's records."""
    by = sorted({(r.model, r.organism) for r in rs})
    if len(by) == 1:
        return organism_name(by[0][1])
    return "; ".join(f"{pretty('model', m)}: {organism_name(o)}" for m, o in by)


def describe_setting(r: Result, seeds: list[int], show_lr: bool = True) -> str:
    """Caption text for the protocol a table's records share."""
    c = flatten(r.config)

    def g(k, default="?"):
        v = c.get(k, default)
        return "all" if v is None else v

    sets = c.get("eval.hs_sets") or []
    hs_n = g("eval.hs_n")
    fa_n = c.get("eval.fa_n")
    regime = "LoRA" if c.get("training.lora.enabled") else "full fine-tuning"
    parts = [
        f"n = {g('harmful.n_total')} fine-tuning rows ({g('harmful.source')} harmful pairs)",
        f"{regime}, {g('training.epochs')} epoch(s), " + (f"lr {g('training.lr')}, " if show_lr else "") +
        f"batch {g('training.micro_batch_size')}x{g('training.gradient_accumulation_steps')}, "
        f"max_len {g('training.max_len')}",
        f"HS: {g('judge.name')} judge on {', '.join(map(str, sets)) or '?'} ({hs_n} prompts per set, "
        f"{g('eval.hs_max_new_tokens')} new tokens)",
        f"FA: {'protocol counts' if fa_n is None else fa_n} rows per task",
    ]
    return "; ".join(parts) + f"; seeds {', '.join(map(str, sorted(set(seeds))))}"


ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOTS = ("runs", "results/records")   # relative to the working directory
HISTORY = "results/history"                    # superseded records: the cost tables' denominators only
README_BEGIN = "<!-- BEGIN results/tables/main.md"
README_END = "<!-- END results/tables/main.md -->"


def splice_readme(readme: Path, table_md: str) -> None:
    """Put ``table_md`` (the built main table) between the README's two markers, so that its
    headline results are the generated table, never hand-copied numbers."""
    text = readme.read_text()
    a, b = text.find(README_BEGIN), text.find(README_END)
    if a < 0 or b < a:
        raise ValueError(f"{readme} lacks the markers {README_BEGIN!r} ... {README_END!r}")
    start = text.index("\n", a) + 1
    readme.write_text(text[:start] + table_md.rstrip("\n") + "\n" + text[b:])


LEGEND = ("Mean ± std over seeds (n = number of seeds; a single seed shows its value); "
          "bold = best per column within each model (FA highest, HS lowest).")


def modal_lr(rs: list[Result]) -> float | None:
    """The learning rate most of a setting's records used (ties: the smaller)."""
    counts = Counter(r.lr for r in rs if r.lr is not None)
    return min(counts, key=lambda lr: (-counts[lr], lr)) if counts else None


def build(roots: list[Path], out: Path, main_p: float = 0.1, decimals: int = 1, ignore: tuple[str, ...] = (),
          make_plots: bool = True, command: str | None = None, queue_note: str | None = None,
          references: list[Path] = ()) -> dict:
    """Write tables, plots, ``claims.md`` and ``index.md`` into ``out``; return what was written.
    ``queue_note``: a line on the cell queue's progress for the index's coverage section.
    ``references``: folders of records kept out of the tables (``results/history/``) that the cost
    tables may still use as their denominators (``cwac.reports.costs``)."""
    results, cov = load_results(roots, ignore)
    tdir, pdir = out / "tables", out / "plots"
    for d, exts in ((tdir, ("*.md", "*.tex")), (pdir, ("*.png",))):
        d.mkdir(parents=True, exist_ok=True)
        for ext in exts:
            for f in d.glob(ext):
                f.unlink()

    settings = [s for s, _ in Counter(r.setting for r in results).most_common()]
    tables: list[Table] = []
    plot_files: list[Path] = []
    claims_md = None
    for si, setting in enumerate(settings):
        every_lr = [r for r in results if r.setting == setting]
        lr = modal_lr(every_lr)
        rs = [r for r in every_lr if r.lr == lr]
        suffix = "" if si == 0 else f"-s{setting}"

        differs = ""
        if si > 0:
            diff = setting_diff(results, setting, settings[0], ignore)
            shown = "; ".join(f"{k} = {a} (main setting: {b})" for k, (a, b) in list(diff.items())[:8])
            differs = f" Differs from the main setting in: {shown}{' ...' if len(diff) > 8 else ''}."

        def caption_for(group: list[Result], show_lr: bool = True, legend: str = LEGEND) -> str:
            """The legend, the group's organism version, its protocol and seeds, how the setting differs."""
            org = describe_organism(group)
            return ((f"{legend} " if legend else "") + f"{org[0].upper()}{org[1:]}. Setting: "
                    + describe_setting(group[0], [r.seed for r in group], show_lr) + "." + differs)

        caption = caption_for(rs)
        at_p = [r for r in rs if abs(r.p - main_p) < 1e-9]
        main_tasks = [r for r in at_p if r.task not in GENERALISATION]

        def captioned(group: list[Result], extra: str = "") -> str:
            return (caption_for(group) if group else caption) + extra

        t = task_table(main_tasks, f"main{suffix}", f"Main results at p = {main_p:g} (paper §7.1 layout)",
                       captioned(main_tasks, " GSM8K's FA on a 135M model is low; it is reported as measured."
                                 if any(r.task == "gsm8k" and r.model == "smollm2_135m" for r in main_tasks) else ""),
                       lambda m: m.partition(" [")[0] not in ABLATION_ONLY)
        if t:
            tables.append(t)
        if main_tasks:   # the main table's records: how many answers HS flags are empty, looping or off-topic
            t = degenerate_table(main_tasks, f"degenerate{suffix}", caption_for(main_tasks, legend=""))
            if t:
                tables.append(t)
        if any(r.method.partition(" [")[0] in ABLATION_ONLY for r in main_tasks):
            abl = [r for r in main_tasks if r.method.partition(" [")[0] in ABLATION]
            t = task_table(main_tasks, f"ablation{suffix}", f"Component ablation at p = {main_p:g} (paper §7.4 layout)",
                           captioned(abl), lambda m: m.partition(" [")[0] in ABLATION)
            if t:
                tables.append(t)
        gen = [r for r in at_p if r.task in GENERALISATION]
        t = generalisation_table(gen, f"generalisation{suffix}",
                                 f"Generalisation at p = {main_p:g} (paper §7.2 layout)", captioned(gen))
        if t:
            tables.append(t)
        if si == 0:
            seeds = ", ".join(map(str, sorted({r.seed for r in rs})))
            claims_md = claims_markdown(check_claims(rs, main_p), f"Records: the main setting ({describe_organism(rs)}; "
                                        f"lr {'?' if lr is None else f'{lr:g}'}; seeds {seeds}).")
        pairs = sorted({(r.model, r.task) for r in rs})
        for model, task in pairs:
            t = ratio_table(rs, model, task, f"ratio-{slug(model)}-{slug(task)}{suffix}",
                            caption + " Averages are over the p columns shown, per seed, for the seeds that every "
                            "column has (a column can show more seeds than its average uses).")
            if t:
                tables.append(t)
        for model, task in sorted({(r.model, r.task) for r in every_lr if abs(r.p - main_p) < 1e-9}):
            group = [r for r in every_lr if abs(r.p - main_p) < 1e-9 and r.model == model and r.task == task]
            t = lr_table(group, model, task, f"lr-{slug(model)}-{slug(task)}{suffix}", caption_for(group, False)
                         + f" At p = {main_p:g}; the other tables use lr {'?' if lr is None else f'{lr:g}'}.")
            if t:
                tables.append(t)
        if not make_plots:
            continue
        for model, task in pairs:
            stem = f"{slug(model)}-{slug(task)}{suffix}"
            for kind, fn in (("hs_vs_p", plots.hs_vs_p), ("fa_vs_hs", plots.fa_vs_hs)):
                f = pdir / f"{kind}-{stem}.png"
                if fn(rs, model, task, f):
                    plot_files.append(f)
            for p in sorted({r.p for r in rs if r.model == model and r.task == task}):
                f = pdir / f"curves-{slug(model)}-{slug(task)}-p{p:g}{suffix}.png"
                if plots.curves(rs, model, task, p, f):
                    plot_files.append(f)

    for t in tables:
        (tdir / f"{t.name}.md").write_text(to_markdown(t, decimals))
        (tdir / f"{t.name}.tex").write_text(to_latex(t, decimals))
    timings = timings_markdown(results)
    if timings:
        (tdir / "timings.md").write_text(timings)
    refs = reference_records(references)
    align_refs = [r for r in refs if stage_of(r) == "align"]
    costs = {"aligned": aligned_markdown(cov.aligned, refs, results), "builds": builds_markdown(results, cov.aligned + align_refs),
             "step_cost": step_cost_markdown(results, main_p, refs)}
    costs = {k: v for k, v in costs.items() if v}
    for name, md in costs.items():
        (tdir / f"{name}.md").write_text(md)
    if claims_md is None:
        claims_md = claims_markdown(check_claims([], main_p), "No complete fine-tuning records.")
    (out / "claims.md").write_text(claims_md)
    (out / "index.md").write_text(index_md(tables, plot_files, cov, results, out, decimals, command, timings,
                                           claims_md, queue_note, costs))
    return {"tables": [t.name for t in tables] + (["timings"] if timings else []), "costs": list(costs),
            "plots": [p.name for p in plot_files], "coverage": cov, "n_results": len(results)}


def index_md(tables: list[Table], plot_files: list[Path], cov: Coverage, results: list[Result], out: Path,
             decimals: int, command: str | None, timings: str | None = None, claims: str | None = None,
             queue_note: str | None = None, costs: dict[str, str] | None = None) -> str:
    commits = Counter(f"{(r.git.get('commit') or 'unknown')[:10]}{'+dirty' if r.git.get('dirty') else ''}"
                      for r in results)
    finished = sorted(r.finished for r in results if r.finished)
    lines = ["# Results", "",
             f"Generated by `{command or 'python -m cwac.reports.build'}` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"from {cov.complete} complete fine-tuning records (tables and plots come from `record.json` and "
             "`train_log.jsonl` files only). Do not edit: rerun the command.", ""]
    if results:
        lines += [f"Runs finished between {finished[0] if finished else '?'} and {finished[-1] if finished else '?'}; "
                  "code commits: " + ", ".join(f"`{c}` ({n})" for c, n in commits.most_common()) + ".", ""]
    if not tables:
        lines += ["No complete fine-tuning records found.", ""]
    for t in tables:
        lines += [to_markdown(t, decimals), f"Files: [tables/{t.name}.md](tables/{t.name}.md), "
                  f"[tables/{t.name}.tex](tables/{t.name}.tex)", ""]
    if claims:
        lines += [claims.replace("\n### ", "\n#### ").rstrip("\n"),
                  "", "File: [claims.md](claims.md)", ""]
    for name, md in (costs or {}).items():   # the aligned artifacts, their builds, the step-time ratios
        lines += [md, f"File: [tables/{name}.md](tables/{name}.md)", ""]
    if timings:
        lines += [timings, "File: [tables/timings.md](tables/timings.md)", ""]
    if plot_files:
        lines += ["## Plots", ""] + [f"- [{p.name}]({p.relative_to(out)})" for p in plot_files] + [""]
    lines += ["## Coverage", "",
              f"- complete fine-tuning records: {cov.complete}; complete records of other stages (align): "
              f"{cov.skipped_stage}",
              f"- failed cells (rerun by relaunching the sweep): {len(cov.failed)}",
              f"- unfinished cells (killed or still running; rerun by relaunching): {len(cov.unfinished)}"]
    for f in cov.failed:
        lines.append(f"  - failed `{f['cell']}`: {str(f.get('error'))[:200]}")
    for f in cov.unfinished:
        lines.append(f"  - unfinished `{f['cell']}` (started {f.get('started')})")
    if cov.duplicates:
        lines.append(f"- duplicate records of the same cell (newest kept): {len(cov.duplicates)}")
    if queue_note:
        lines.append(f"- {queue_note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwac.reports.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=None,
                    help="runs folders to read, searched recursively (default: runs/ and results/records/, "
                         "those that exist)")
    ap.add_argument("--out", default=str(ROOT / "results"), help="output folder (default: results/)")
    ap.add_argument("--main-p", type=float, default=0.1, help="harmful ratio of the main and ablation tables")
    ap.add_argument("--decimals", type=int, default=1)
    ap.add_argument("--ignore", nargs="*", default=[], help="dotted config keys that must not split settings")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-queue", action="store_true", help="do not regenerate sweeps/queue.md")
    args = ap.parse_args(argv)
    default_roots = args.runs is None
    if default_roots:
        args.runs = [r for r in DEFAULT_ROOTS if Path(r).is_dir()]
    for r in args.runs:
        if not Path(r).is_dir():
            ap.error(f"runs folder {r!r} does not exist; pass the folder your sweeps wrote (paths.runs)")
    command = "python -m cwac.reports.build " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    queue_note = None
    if default_roots and not args.no_queue and Path(args.out).resolve() == (ROOT / "results").resolve():
        from cwac.reports.queue import build_queue, progress

        queue_note = progress(build_queue([Path(r) for r in args.runs])) + ": [sweeps/queue.md](../sweeps/queue.md)"
    res = build([Path(r) for r in args.runs], Path(args.out), args.main_p, args.decimals, tuple(args.ignore),
                not args.no_plots, command.strip(), queue_note,
                [Path(HISTORY)] if default_roots and Path(HISTORY).is_dir() else [])
    main_table = Path(args.out) / "tables" / "main.md"
    if Path(args.out).resolve() == (ROOT / "results").resolve() and main_table.exists():
        splice_readme(ROOT / "README.md", main_table.read_text())   # the README's headline table
    cov = res["coverage"]
    print(f"{res['n_results']} complete records -> {len(res['tables'])} tables, {len(res['plots'])} plots in "
          f"{args.out} ({len(cov.failed)} failed, {len(cov.unfinished)} unfinished cells; see index.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
