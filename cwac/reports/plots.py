"""Plots a researcher expects next to the tables, from records and train logs only.

* ``hs_vs_p``: HS and FA against the harmful ratio p, one line per method measured at two
  ratios or more (mean ± std over seeds) — the picture behind paper §7.3.
* ``fa_vs_hs``: FA against HS per model and task, one point per method and p (mean, with
  std bars); the upper-left corner is the goal (docs/method.md §7's "balance" of HS and FA).
* ``curves``: every logged loss and metric over optimiser steps (``losses/total``,
  ``losses/task``, ``losses/cwac_safety``, ``metrics/proj_leak`` — the drift leak — and
  whatever else a method logs), one line per method (mean over seeds, band = min..max).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cwac.reports.collect import Result, read_train_log  # noqa: E402
from cwac.reports.tables import Stat, _order, pretty  # noqa: E402

CURVE_FIRST = ("losses/total", "losses/task", "losses/cwac_safety", "metrics/proj_leak")
CURVE_SKIP = ("lr",)
MAX_PANELS = 9


MARKERS = ("o", "s", "^", "D", "v", "P")


HIGHLIGHT = "cwac"   # the paper's method: black, so it never shares a colour with a baseline


def _styles(methods: list[str]) -> dict[str, dict]:
    """A colour + marker + line style per method, distinct for up to 60 methods (tab10 alone
    repeats after 10, which made CWAC and AsFT the same orange)."""
    cmap = plt.get_cmap("tab10")
    out = {HIGHLIGHT: {"color": "black", "marker": "o", "linestyle": "-"}} if HIGHLIGHT in methods else {}
    for i, m in enumerate(m for m in methods if m != HIGHLIGHT):
        out[m] = {"color": cmap(i % 10), "marker": MARKERS[(i // 10) % len(MARKERS)],
                  "linestyle": "-" if i < 10 else "--"}
    return out


def _legend_right(fig, ax) -> None:
    """One legend outside the axes, to the right, so it never hides a point."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def hs_vs_p(results: list[Result], model: str, task: str, path: Path) -> list[str]:
    """Lines for the methods measured at two ratios or more (the methods and variants run at
    one ratio only are in the tables and in ``fa_vs_hs``); returns the methods drawn."""
    rs = [r for r in results if r.model == model and r.task == task]
    ps = sorted({r.p for r in rs})
    methods = [m for m in _order("method", (r.method for r in rs)) if len({r.p for r in rs if r.method == m}) >= 2]
    if len(ps) < 2 or not methods:
        return []
    styles = _styles(methods)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "hs", "HS (%) ↓"), (axes[1], "fa", "FA (%) ↑")):
        for m in methods:
            xs, ys, es = [], [], []
            for p in ps:
                s = Stat.of([getattr(r, metric) for r in rs if r.method == m and r.p == p])
                if s is not None:
                    xs.append(p)
                    ys.append(s.mean)
                    es.append(s.std or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, capsize=3, label=pretty("method", m), **styles[m])
        ax.set_xlabel("harmful ratio p")
        ax.set_ylabel(label)
        ax.set_xticks(ps, [f"{p:g}" for p in ps])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{pretty('model', model)}, {pretty('task', task)}: HS and FA vs harmful ratio")
    fig.tight_layout()
    _legend_right(fig, axes[0])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return methods


def fa_vs_hs(results: list[Result], model: str, task: str, path: Path) -> bool:
    rs = [r for r in results if r.model == model and r.task == task and r.fa is not None and r.hs is not None]
    if not rs:
        return False
    methods = _order("method", (r.method for r in rs))
    styles = _styles(methods)
    ps = sorted({r.p for r in rs})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        pts = []
        for p in ps:
            g = [r for r in rs if r.method == m and r.p == p]
            hs, fa = Stat.of([r.hs for r in g]), Stat.of([r.fa for r in g])
            if hs is not None and fa is not None:
                pts.append((p, hs, fa))
        if not pts:
            continue
        ax.errorbar([h.mean for _, h, _ in pts], [f.mean for _, _, f in pts], xerr=[h.std or 0.0 for _, h, _ in pts],
                    yerr=[f.std or 0.0 for _, _, f in pts], capsize=3, label=pretty("method", m), alpha=0.9,
                    **{**styles[m], "linestyle": styles[m]["linestyle"] if len(pts) > 1 else "none"})
        if len(ps) > 1:
            for p, h, f in pts:
                ax.annotate(f"p={p:g}", (h.mean, f.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("HS (%) ↓")
    ax.set_ylabel("FA (%) ↑")
    ax.grid(alpha=0.3)
    ax.set_title(f"{pretty('model', model)}, {pretty('task', task)}: FA vs HS"
                 + ("" if len(ps) > 1 else f" (p={ps[0]:g})"))
    fig.tight_layout()
    _legend_right(fig, ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def curves(results: list[Result], model: str, task: str, p: float, path: Path) -> bool:
    rs = [r for r in results if r.model == model and r.task == task and r.p == p]
    methods = _order("method", (r.method for r in rs))
    # method -> key -> step -> values over seeds
    data: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rs:
        for row in read_train_log(r.run_dir):
            for k, v in row.items():
                if k != "step" and k not in CURVE_SKIP:
                    data[r.method][k][row["step"]].append(float(v))
    keys = sorted({k for d in data.values() for k in d},
                  key=lambda k: (CURVE_FIRST.index(k) if k in CURVE_FIRST else len(CURVE_FIRST), k))[:MAX_PANELS]
    if not keys:
        return False
    styles = _styles(methods)
    ncol = min(3, len(keys))
    nrow = (len(keys) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for m in methods:
            series = data.get(m, {}).get(key)
            if not series:
                continue
            steps = sorted(series)
            mean = [statistics.fmean(series[s]) for s in steps]
            ax.plot(steps, mean, color=styles[m]["color"], linestyle=styles[m]["linestyle"],
                    label=pretty("method", m), lw=1.2)
            if any(len(series[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(series[s]) for s in steps], [max(series[s]) for s in steps],
                                color=styles[m]["color"], alpha=0.2, lw=0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{pretty('model', model)}, {pretty('task', task)}, p={p:g}: training curves (mean over seeds)")
    fig.tight_layout()
    _legend_right(fig, axes.flat[0])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
