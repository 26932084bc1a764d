"""The paper's tables (docs/method.md §7), built from ``Result`` rows and written as markdown and
LaTeX (booktabs).

* **main** (§7.1): rows model x method at the main harmful ratio, columns FA / HS per task
  and their averages over tasks.
* **ratio** (§7.3): one table per model and task, rows method, columns HS per p, then the
  average HS and the average FA over those p.
* **ablation** (§7.4): the main layout restricted to CWAC and its single-constraint variants.
* **generalisation** (§7.2): rows model x method, PubMedQA FA / HS and the AlpacaEval win rate (AE,
  the FA of ``task=alpaca_eval`` records; absent, with the reason, when no judge scored it).
* **lr**: one table per model and task, rows method, FA and HS per fine-tuning learning rate.

Every cell is mean ± sample std over seeds (n = 1: the value alone); the ``n`` column gives
the number of seeds. An average over tasks (or p) is taken per seed, over the seeds present
in every averaged column, so its std is the spread of per-seed averages. In each column the
best mean (FA highest, HS lowest) is bold, within each model block.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from cwac.reports.collect import Result
from cwac.reports.samples import fa_rows

TASK_ORDER = ("sst2", "agnews", "gsm8k")
TASK_NAMES = {"sst2": "SST-2", "agnews": "AG News", "gsm8k": "GSM8K", "pubmedqa": "PubMedQA",
              "alpaca_eval": "AlpacaEval"}
GENERALISATION = ("pubmedqa", "alpaca_eval")   # tasks of the §7.2 table, never of the main one
MODEL_ORDER = ("llama2_7b_chat", "llama3_8b_instruct", "mistral_7b_instruct", "gemma2_9b_it", "smollm2_135m", "tiny")
MODEL_NAMES = {"llama2_7b_chat": "Llama-2-7B", "llama3_8b_instruct": "Llama-3-8B", "mistral_7b_instruct": "Mistral-7B",
               "gemma2_9b_it": "Gemma-2-9B", "smollm2_135m": "SmolLM2-135M", "tiny": "tiny Llama"}
# Baselines first in the paper's order, then the other defences, CWAC last (as in paper §7.1).
METHOD_ORDER = ("sft", "asft", "safeinstr", "sppft", "lisa", "safelora", "vaccine", "booster", "tvaccine", "repnoise",
                "ldifs", "antidote", "cwac_weight_only", "cwac_act_only", "cwac")
METHOD_NAMES = {"sft": "SFT", "asft": "AsFT", "safeinstr": "SafeInstr", "sppft": "SPPFT", "lisa": "Lisa",
                "safelora": "SafeLoRA", "vaccine": "Vaccine", "booster": "Booster", "tvaccine": "T-Vaccine",
                "repnoise": "RepNoise", "ldifs": "LDIFS", "antidote": "Antidote", "cwac": "CWAC",
                "cwac_weight_only": "weight-only", "cwac_act_only": "activation-only"}
ABLATION = ("cwac_weight_only", "cwac_act_only", "cwac")
ABLATION_ONLY = ("cwac_weight_only", "cwac_act_only")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds."""

    mean: float
    std: float | None   # None when n < 2
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, decimals: int, pm: str = " ± ") -> str:
        s = f"{self.mean:.{decimals}f}"
        return s if self.std is None else f"{s}{pm}{self.std:.{decimals}f}"


@dataclass
class Column:
    key: str
    label: str                   # e.g. "FA ↑"
    group: str = ""              # header group, e.g. "SST-2"
    higher_is_better: bool | None = None   # None: never bold


@dataclass
class Row:
    labels: list[str]            # row-header cells, e.g. [model, method]
    block: str                   # bold is decided within a block
    cells: dict[str, Stat | None]
    n: str = ""                  # seeds, e.g. "3" or "1-3"


@dataclass
class Table:
    name: str                    # file stem
    title: str
    caption: str
    row_header: list[str]
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)

    def bold(self, decimals: int) -> set[tuple[int, str]]:
        """(row index, column key) of the best displayed mean per column and block."""
        out: set[tuple[int, str]] = set()
        blocks: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rows):
            blocks[r.block].append(i)
        for col in self.columns:
            if col.higher_is_better is None:
                continue
            for idx in blocks.values():
                vals = {i: round(self.rows[i].cells[col.key].mean, decimals) for i in idx
                        if self.rows[i].cells.get(col.key) is not None}
                if len(vals) < 2:
                    continue
                best = max(vals.values()) if col.higher_is_better else min(vals.values())
                out.update((i, col.key) for i, v in vals.items() if v == best)
        return out


def pretty(kind: str, name: str) -> str:
    """Display name of a model / task / method label (variant suffixes are kept)."""
    table = {"model": MODEL_NAMES, "task": TASK_NAMES, "method": METHOD_NAMES}[kind]
    base, sep, rest = name.partition(" [")
    parts = [table.get(b, b) for b in base.split("+")]
    return "+".join(parts) + (sep + rest if sep else "")


def _order(kind: str, names) -> list[str]:
    ref = {"model": MODEL_ORDER, "task": TASK_ORDER, "method": METHOD_ORDER}[kind]

    def key(n: str):
        base = n.partition(" [")[0].split("+")[-1]
        if base in ref:
            return (ref.index(base), n)
        # unknown methods go after the known baselines, before CWAC and its variants
        return (ref.index("cwac_weight_only") - 0.5 if kind == "method" else len(ref), n)

    return sorted(set(names), key=key)


def _seeds_text(ns: list[int]) -> str:
    ns = [n for n in ns if n]
    if not ns:
        return "0"
    return str(ns[0]) if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"


def _per_seed(results: list[Result], metric: str) -> dict[int, float]:
    return {r.seed: getattr(r, metric) for r in results if getattr(r, metric) is not None}


def _average(groups: list[list[Result]], metric: str) -> Stat | None:
    """Per-seed average over ``groups`` (columns), over the seeds present in all of them."""
    if not groups or any(not g for g in groups):
        return None
    per = [_per_seed(g, metric) for g in groups]
    seeds = set.intersection(*(set(p) for p in per))
    return Stat.of([statistics.fmean(p[s] for p in per) for s in sorted(seeds)])


def task_table(results: list[Result], name: str, title: str, caption: str, methods_filter=None) -> Table | None:
    """The main / ablation layout: rows (model, method), FA and HS per task, averages."""
    rs = [r for r in results if methods_filter is None or methods_filter(r.method)]
    if not rs:
        return None
    tasks = _order("task", (r.task for r in rs))
    cols: list[Column] = []
    for t in tasks:
        g = pretty("task", t)
        cols += [Column(f"{t}/fa", "FA ↑", g, True), Column(f"{t}/hs", "HS ↓", g, False)]
    if len(tasks) > 1:
        cols += [Column("avg/fa", "FA ↑", "Avg", True), Column("avg/hs", "HS ↓", "Avg", False)]
    table = Table(name, title, caption, ["Model", "Method"], cols)
    by: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
    for r in rs:
        by[(r.model, r.method, r.task)].append(r)
    for model in _order("model", (r.model for r in rs)):
        methods = _order("method", (r.method for r in rs if r.model == model))
        for j, method in enumerate(methods):
            cells: dict[str, Stat | None] = {}
            ns = []
            for t in tasks:
                g = by.get((model, method, t), [])
                cells[f"{t}/fa"] = Stat.of([r.fa for r in g])
                cells[f"{t}/hs"] = Stat.of([r.hs for r in g])
                ns.append(len(g))
            if len(tasks) > 1:
                groups = [by.get((model, method, t), []) for t in tasks]
                cells["avg/fa"] = _average(groups, "fa")
                cells["avg/hs"] = _average(groups, "hs")
            table.rows.append(Row([pretty("model", model) if j == 0 else "", pretty("method", method)], model,
                                  cells, _seeds_text(ns)))
    return table


def ratio_table(results: list[Result], model: str, task: str, name: str, caption: str) -> Table | None:
    """Paper §7.3 layout for one model and task: HS per p, Avg HS and Avg FA over those p."""
    rs = [r for r in results if r.model == model and r.task == task]
    ps = sorted({r.p for r in rs})
    if len(ps) < 2:
        return None
    cols = [Column(f"p{p:g}/hs", f"p={p:g}", "HS ↓", False) for p in ps]
    cols += [Column("avg/hs", "Avg HS ↓", "", False), Column("avg/fa", "Avg FA ↑", "", True)]
    title = f"Harmful-ratio sweep: {pretty('model', model)}, {pretty('task', task)}"
    table = Table(name, title, caption, ["Method"], cols)
    by: dict[tuple[str, float], list[Result]] = defaultdict(list)
    for r in rs:
        by[(r.method, r.p)].append(r)
    for method in _order("method", (r.method for r in rs)):
        groups = [by.get((method, p), []) for p in ps]
        cells: dict[str, Stat | None] = {f"p{p:g}/hs": Stat.of([r.hs for r in g]) for p, g in zip(ps, groups)}
        cells["avg/hs"] = _average(groups, "hs")
        cells["avg/fa"] = _average(groups, "fa")
        table.rows.append(Row([pretty("method", method)], "all", cells, _seeds_text([len(g) for g in groups])))
    return table


def generalisation_table(results: list[Result], name: str, title: str, caption: str) -> Table | None:
    """Paper §7.2: PubMedQA FA and HS, and AE (the AlpacaEval win rate: the FA of ``task=alpaca_eval``
    records). When no record has a win rate, the caption says why (``metrics.fa_absent``)."""
    rs = [r for r in results if r.task in GENERALISATION]
    if not rs:
        return None
    cols = [Column("pubmedqa/fa", "FA ↑", "PubMedQA", True), Column("pubmedqa/hs", "HS ↓", "PubMedQA", False),
            Column("alpaca_eval/fa", "AE ↑", "AlpacaEval", True)]
    ae = [r for r in rs if r.task == "alpaca_eval"]
    if not any(r.fa is not None for r in ae):
        reasons = sorted({str(r.metrics.get("fa_absent")) for r in ae if r.metrics.get("fa_absent")})
        why = ("; ".join(reasons) if reasons else
               "no AlpacaEval record: the win rate needs a judge model (eval.alpaca_eval.judge), and none is "
               "available offline")
        caption = f"{caption} AE is absent: {why}."
    labels = label_shares([r for r in rs if r.task == "pubmedqa"])
    if labels:
        shown = ", ".join(f"{k} {v:.1f}%" for k, v in labels.items())
        top, share = next(iter(labels.items()))
        caption = (f"{caption} PubMedQA's FA rows are labelled {shown} (pooled over the records' samples): "
                   f"answering \"{top}\" to every row scores {share:.1f}.")
    table = Table(name, title, caption, ["Model", "Method"], cols)
    by: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
    for r in rs:
        by[(r.model, r.method, r.task)].append(r)
    for model in _order("model", (r.model for r in rs)):
        for j, method in enumerate(_order("method", (r.method for r in rs if r.model == model))):
            pq, al = by.get((model, method, "pubmedqa"), []), by.get((model, method, "alpaca_eval"), [])
            cells = {"pubmedqa/fa": Stat.of([r.fa for r in pq]), "pubmedqa/hs": Stat.of([r.hs for r in pq]),
                     "alpaca_eval/fa": Stat.of([r.fa for r in al])}
            table.rows.append(Row([pretty("model", model) if j == 0 else "", pretty("method", method)], model, cells,
                                  _seeds_text([len(pq), len(al)])))
    return table


def label_shares(results: list[Result]) -> dict[str, float]:
    """{label: share (%)} of the FA rows' reference labels, pooled over the records' FA samples and
    most common first: the first share is what a constant answer of that label scores (the floor a
    classifier's FA has to clear). Empty when no record kept its FA samples."""
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(str(row.get("label")) for row in fa_rows(r.run_dir, r.task) or [])
    n = sum(counts.values())
    return {k: 100.0 * v / n for k, v in counts.most_common()} if n else {}


def lr_table(results: list[Result], model: str, task: str, name: str, caption: str) -> Table | None:
    """Learning-rate sensitivity for one model and task: FA and HS per fine-tuning lr, rows method."""
    rs = [r for r in results if r.model == model and r.task == task and r.lr is not None]
    lrs = sorted({float(r.lr) for r in rs})
    if len(lrs) < 2:
        return None
    cols: list[Column] = []
    for lr in lrs:
        g = f"lr {lr:g}"
        cols += [Column(f"{lr:g}/fa", "FA ↑", g, True), Column(f"{lr:g}/hs", "HS ↓", g, False)]
    title = f"Learning-rate sensitivity: {pretty('model', model)}, {pretty('task', task)}"
    table = Table(name, title, caption, ["Method"], cols)
    by: dict[tuple[str, float], list[Result]] = defaultdict(list)
    for r in rs:
        by[(r.method, float(r.lr))].append(r)
    for method in _order("method", (r.method for r in rs)):
        cells: dict[str, Stat | None] = {}
        for lr in lrs:
            cells[f"{lr:g}/fa"] = Stat.of([r.fa for r in by.get((method, lr), [])])
            cells[f"{lr:g}/hs"] = Stat.of([r.hs for r in by.get((method, lr), [])])
        table.rows.append(Row([pretty("method", method)], "all", cells,
                              _seeds_text([len(by.get((method, lr), [])) for lr in lrs])))
    return table


def host_label(host: dict | None) -> str:
    """``AMD EPYC (avx2; 1 threads)``: the CPU, its ISA flags and torch threads of a record's ``host``."""
    if not host:
        return "not recorded"
    isa = ", ".join(host.get("isa") or []) or "none of AVX2/AVX-512/AMX"
    gpu = f"; {host['gpu']}" if host.get("gpu") else ""
    return f"{host.get('cpu')} ({isa}; {host.get('torch_threads')} threads){gpu}"


def timings_markdown(results: list[Result]) -> str | None:
    """Each cell's time from its record (``timings``), with the host it ran on (``record["host"]``):
    a time says little without the CPU (the same step ran 1.8-1.9x slower per token on an AVX2-only host)."""
    rows = [r for r in results if r.timings.get("total_seconds") is not None]
    if not rows:
        return None

    def sec(r: Result, k: str) -> str:
        v = r.timings.get(k)
        return "–" if v is None else f"{v:.1f}"

    lines = ["### Cell times", "",
             "| Model | Task | p | Method | Seed | total s | train s (s/step) | eval s | prepare s | host | finished |",
             "|:--|:--|--:|:--|--:|--:|--:|--:|--:|:--|:--|"]
    for r in sorted(rows, key=lambda r: r.finished):
        train = sec(r, "train_seconds")
        if r.timings.get("seconds_per_step") is not None:
            train += f" ({r.timings['seconds_per_step']:.2f})"
        lines.append(f"| {pretty('model', r.model)} | {pretty('task', r.task)} | {r.p:g} | {pretty('method', r.method)} "
                     f"| {r.seed} | {sec(r, 'total_seconds')} | {train} | {sec(r, 'eval_seconds')} "
                     f"| {sec(r, 'prepare_seconds')} | {host_label(r.host)} | {r.finished} |")
    lines += ["", "From each record's `timings` (total = the whole cell, start model and evaluation included) and "
              "`host`; prepare = the method's one-off work (CWAC's subspace, SAE and latents when first built).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- rendering


def to_markdown(table: Table, decimals: int = 1) -> str:
    bold = table.bold(decimals)
    head = [*table.row_header,
            *[f"{c.group} {c.label}".strip() if c.group else c.label for c in table.columns], "n"]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":--"] * len(table.row_header) + ["--:"] * (len(table.columns) + 1)) + "|"]
    for i, r in enumerate(table.rows):
        cells = []
        for c in table.columns:
            s = r.cells.get(c.key)
            text = "–" if s is None else s.text(decimals)
            cells.append(f"**{text}**" if (i, c.key) in bold else text)
        lines.append("| " + " | ".join([*r.labels, *cells, r.n]) + " |")
    lines += ["", table.caption, ""]
    return "\n".join(lines)


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("§", r"\S{}"), ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$"), ("±", r"$\pm$")):
        s = s.replace(a, b)
    return s


def to_latex(table: Table, decimals: int = 1) -> str:
    bold = table.bold(decimals)
    nh = len(table.row_header)
    spec = "l" * nh + "c" * len(table.columns) + "c"
    out = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{_tex(table.title)}. {_tex(table.caption)}}}",
           f"\\label{{tab:{table.name}}}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
    groups: list[tuple[str, int]] = []
    for c in table.columns:
        if groups and groups[-1][0] == c.group:
            groups[-1] = (c.group, groups[-1][1] + 1)
        else:
            groups.append((c.group, 1))
    if any(g for g, _ in groups):
        cells, rules, col = [""] * nh, [], nh + 1
        for g, span in groups:
            cells.append(f"\\multicolumn{{{span}}}{{c}}{{{_tex(g)}}}" if g else " & ".join([""] * span))
            if g:
                rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        out.append(" & ".join([*cells, ""]) + r" \\")
        out.append("".join(rules))
    out.append(" & ".join([*map(_tex, table.row_header), *(_tex(c.label) for c in table.columns), "$n$"]) + r" \\")
    out.append(r"\midrule")
    prev_block = None
    for i, r in enumerate(table.rows):
        if prev_block is not None and r.block != prev_block:
            out.append(r"\midrule")
        prev_block = r.block
        cells = []
        for c in table.columns:
            s = r.cells.get(c.key)
            text = "--" if s is None else s.text(decimals, pm=r" $\pm$ ")
            cells.append(f"\\textbf{{{text}}}" if (i, c.key) in bold else text)
        out.append(" & ".join([*map(_tex, r.labels), *cells, r.n]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
