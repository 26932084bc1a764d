"""The paper's four qualitative claims (docs/method.md §7), checked from the records.

(a) CWAC's HS is below SFT's and below every baseline's (§7.1, at the main harmful ratio, per task);
(b) CWAC's FA is within ±1 point of SFT's (§7.1, per task);
(c) each single-constraint variant (``cwac_weight_only``, ``cwac_act_only``) has a higher HS than
    CWAC (§7.4, per task);
(d) HS grows with the harmful ratio p, and CWAC stays lowest at every p (§7.3).

Each claim is a set of comparisons between two methods (or two ratios) of one model and task. A
comparison's difference is estimated with a **paired, two-level bootstrap** (Davison & Hinkley 1997,
§3.8 on hierarchical data): each replicate draws the seeds with replacement, and within each drawn
seed the prompts (HS) or FA rows with replacement, the two methods paired by prompt; the replicate's
difference is the mean over the drawn seeds of the per-seed difference of the two means. The interval
is the 2.5-97.5 percentile of ``N_BOOT`` replicates from a fixed RNG seed, so a build is
reproducible. With one seed the interval reflects prompt noise only; a record without sample files
enters with its per-seed metric (seed noise only).

Verdicts per comparison: a strict claim (``diff > 0``) *holds* when the interval lies above 0, *fails*
when it lies below 0, and is a *tie within noise* otherwise; a ``|diff| <= margin`` claim holds when
the interval lies inside ±margin, fails when it lies wholly outside, and ties otherwise. A claim fails
when any comparison fails, holds when all hold, is a tie otherwise, and is "not run" without
comparisons. A claim that fails shows its evidence: the prompts where CWAC answers (judged harmful)
and the other method refuses, and the per-seed numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from cwac.reports.collect import Result
from cwac.reports.samples import fa_rows, hs_rows
from cwac.reports.tables import METHOD_ORDER, TASK_ORDER, pretty

N_BOOT = 2000
BOOT_SEED = 12384          # fixed: the same records give the same intervals
FA_MARGIN = 1.0            # claim (b): within ±1 point
CWAC = "cwac"
VARIANTS = ("cwac_weight_only", "cwac_act_only")
N_EVIDENCE = 3             # samples shown per failing comparison

HOLDS, FAILS, TIE, NOT_RUN = "holds", "fails", "tie within noise", "not run"


@dataclass
class Estimate:
    """A bootstrapped difference ``b - a`` (percentage points)."""

    diff: float
    lo: float
    hi: float
    per_seed: dict[int, tuple[float, float]]   # seed -> (a, b) on the paired items
    n_items: int                               # paired items per seed (smallest)
    prompt_level: bool                         # False: some seed had no sample files


@dataclass
class Comparison:
    label: str                 # e.g. "SST-2: SFT vs CWAC"
    a: str                     # e.g. "CWAC"
    b: str
    kind: str                  # "greater" (b - a > 0) or "within" (|b - a| <= margin)
    est: Estimate
    margin: float = 0.0
    ra: list[Result] = field(default_factory=list, repr=False)   # the records behind a and b
    rb: list[Result] = field(default_factory=list, repr=False)
    evidence: list[dict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        lo, hi = self.est.lo, self.est.hi
        if self.kind == "greater":
            return HOLDS if lo > 0 else FAILS if hi < 0 else TIE
        m = self.margin
        return HOLDS if (lo >= -m and hi <= m) else FAILS if (lo > m or hi < -m) else TIE


@dataclass
class Claim:
    key: str
    text: str
    quantity: str              # what Δ is, for the table header
    comparisons: list[Comparison] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        vs = [c.verdict for c in self.comparisons]
        if not vs:
            return NOT_RUN
        return FAILS if FAILS in vs else HOLDS if all(v == HOLDS for v in vs) else TIE


# ---------------------------------------------------------------- per-item outcomes


def _keyed(rows: list[dict], prefix: str, text_key: str, value) -> dict[tuple, float]:
    seen: Counter = Counter()
    out = {}
    for r in rows:
        t = str(r.get(text_key))
        seen[t] += 1
        out[(prefix, t, seen[t])] = float(value(r))
    return out


def items(r: Result, metric: str) -> dict[tuple, float] | None:
    """{item: outcome in 0..100} of one record: HS prompts (100 = flagged) or FA rows (100 = correct);
    None when the record kept no sample files for it."""
    if metric == "hs":
        sets = hs_rows(r.run_dir)
        if not sets:
            return None
        out: dict[tuple, float] = {}
        for s, rows in sets.items():
            out.update(_keyed(rows, s, "prompt", lambda x: 100.0 * bool(x.get("flagged"))))
        return out
    rows = fa_rows(r.run_dir, r.task)
    return None if not rows else _keyed(rows, r.task, "input", lambda x: 100.0 * bool(x.get("correct")))


def paired_bootstrap(a: list[Result], b: list[Result], metric: str) -> Estimate | None:
    """The difference ``b - a`` of ``metric`` over the seeds both have (module docstring)."""
    sa, sb = {r.seed: r for r in a}, {r.seed: r for r in b}
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        return None
    diffs: list[np.ndarray] = []
    per_seed: dict[int, tuple[float, float]] = {}
    prompt_level = True
    for s in seeds:
        ia, ib = items(sa[s], metric), items(sb[s], metric)
        common = sorted(set(ia) & set(ib), key=str) if ia and ib else []
        if common:
            va = np.array([ia[k] for k in common])
            vb = np.array([ib[k] for k in common])
        else:   # no samples to pair: the seed enters with its record's metric
            ma, mb = getattr(sa[s], metric), getattr(sb[s], metric)
            if ma is None or mb is None:
                continue
            prompt_level = False
            va, vb = np.array([float(ma)]), np.array([float(mb)])
        diffs.append(vb - va)
        per_seed[s] = (float(va.mean()), float(vb.mean()))
    if not diffs:
        return None
    rng = np.random.default_rng(BOOT_SEED)
    k = len(diffs)
    draws = rng.integers(k, size=(N_BOOT, k))             # seeds, with replacement
    means = np.stack([d[rng.integers(len(d), size=(N_BOOT, k, len(d)))].mean(-1) for d in diffs])   # (seed, B, k)
    reps = means[draws, np.arange(N_BOOT)[:, None], np.arange(k)[None, :]].mean(1)
    point = float(np.mean([d.mean() for d in diffs]))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return Estimate(point, float(lo), float(hi), per_seed, min(len(d) for d in diffs), prompt_level)


def flagged_vs_refused(cwac: list[Result], other: list[Result], n: int = N_EVIDENCE) -> list[dict]:
    """Prompts where CWAC's answer is flagged (judged harmful) and the other method's is not, same
    seed and prompt, with both answers."""
    out = []
    so = {r.seed: r for r in other}
    for rc in sorted(cwac, key=lambda r: r.seed):
        ro = so.get(rc.seed)
        if ro is None:
            continue
        a, b = hs_rows(rc.run_dir) or {}, hs_rows(ro.run_dir) or {}
        for s in sorted(set(a) & set(b)):
            other_by_prompt = {x.get("prompt"): x for x in b[s]}
            for x in a[s]:
                y = other_by_prompt.get(x.get("prompt"))
                if y is not None and x.get("flagged") and not y.get("flagged"):
                    out.append({"seed": rc.seed, "set": s, "prompt": x.get("prompt"), "cwac": x.get("answer"),
                                "other": y.get("answer")})
                    if len(out) >= n:
                        return out
    return out


def wrong_vs_right(cwac: list[Result], sft: list[Result], n: int = N_EVIDENCE) -> list[dict]:
    """FA rows CWAC gets wrong and SFT right (same seed and row)."""
    out = []
    so = {r.seed: r for r in sft}
    for rc in sorted(cwac, key=lambda r: r.seed):
        ro = so.get(rc.seed)
        a, b = (fa_rows(rc.run_dir, rc.task) or []), (fa_rows(ro.run_dir, ro.task) or []) if ro else []
        for x, y in zip(a, b):
            if x.get("input") == y.get("input") and not x.get("correct") and y.get("correct"):
                out.append({"seed": rc.seed, "set": rc.task, "prompt": x.get("input"), "cwac": x.get("answer"),
                            "other": y.get("answer"), "label": x.get("label")})
                if len(out) >= n:
                    return out
    return out


# ---------------------------------------------------------------- the claims


def _plain(method: str) -> bool:
    """Rows with a method's documented defaults (a variant label ``cwac [lam=1]`` is not CWAC)."""
    return " [" not in method


def _group(results: list[Result]) -> dict[tuple, list[Result]]:
    by: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        if _plain(r.method):
            by[(r.model, r.task, r.p, r.method)].append(r)
    return by


def _where(model: str, task: str, models: set[str], p: float | None = None) -> str:
    s = (f"{pretty('model', model)}, " if len(models) > 1 else "") + pretty("task", task)
    return s + (f", p = {p:g}" if p is not None else "")


def _baselines(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods and m != CWAC and m not in VARIANTS]
    return known + sorted(m for m in methods if m not in METHOD_ORDER and m != CWAC and m not in VARIANTS)


def _compare(label: str, a: str, b: str, ra: list[Result], rb: list[Result], metric: str,
             margin: float | None = None) -> Comparison | None:
    est = paired_bootstrap(ra, rb, metric) if ra and rb else None
    if est is None:
        return None
    return Comparison(label, a, b, "greater" if margin is None else "within", est, margin or 0.0, ra, rb)


def check_claims(results: list[Result], main_p: float = 0.1, expected_baselines=None) -> list[Claim]:
    """The four claims on ``results`` (one setting and learning rate: the main table's records).

    Args:
        expected_baselines: method names the paper compares CWAC with; those without records are
            listed as not run (default: every baseline of the main table, METHOD_ORDER).
    """
    expected = list(expected_baselines or [m for m in METHOD_ORDER if m != CWAC and m not in VARIANTS])
    by = _group(results)
    models = {r.model for r in results}
    tasks_main = sorted({(r.model, r.task) for r in results if abs(r.p - main_p) < 1e-9 and r.task in TASK_ORDER},
                        key=lambda mt: (mt[0], TASK_ORDER.index(mt[1])))
    a = Claim("a", "CWAC's HS is below SFT's and below every baseline's", "HS(other) − HS(CWAC)")
    b = Claim("b", f"CWAC's FA is within ±{FA_MARGIN:g} point of SFT's", "FA(CWAC) − FA(SFT)")
    c = Claim("c", "each single-constraint variant is worse than CWAC on HS", "HS(variant) − HS(CWAC)")
    d = Claim("d", "HS grows with p, and CWAC stays lowest", "HS(high p) − HS(low p), HS(other) − HS(CWAC)")
    for model, task in tasks_main:
        where = _where(model, task, models)
        cw = by.get((model, task, main_p, CWAC), [])
        methods = {k[3] for k in by if k[:3] == (model, task, main_p)}
        if not cw:
            for cl in (a, b, c):
                cl.missing.append(f"{where}: CWAC")
            continue
        for m in _baselines(methods):
            cmp = _compare(f"{where}: {pretty('method', m)}", "CWAC", pretty("method", m), cw,
                           by[(model, task, main_p, m)], "hs")
            a.comparisons += [cmp] if cmp else []
        a.missing += [f"{where}: {pretty('method', m)}" for m in expected if m not in methods]
        cmp = _compare(where, "SFT", "CWAC", by.get((model, task, main_p, "sft"), []), cw, "fa", FA_MARGIN)
        b.comparisons += [cmp] if cmp else []
        b.missing += [] if cmp else [f"{where}: SFT"]
        for v in VARIANTS:
            cmp = _compare(f"{where}: {pretty('method', v)}", "CWAC", pretty("method", v), cw,
                           by.get((model, task, main_p, v), []), "hs")
            c.comparisons += [cmp] if cmp else []
            c.missing += [] if cmp else [f"{where}: {pretty('method', v)}"]
    if not tasks_main:
        for cl in (a, b, c):
            cl.missing.append(f"p = {main_p:g}: no records")

    ratio_pairs = sorted({(k[0], k[1]) for k in by if len({q[2] for q in by if q[:2] == k[:2]}) >= 2})
    for model, task in ratio_pairs:
        ps = sorted({k[2] for k in by if k[:2] == (model, task)})
        for m in sorted({k[3] for k in by if k[:2] == (model, task)},
                        key=lambda x: METHOD_ORDER.index(x) if x in METHOD_ORDER else len(METHOD_ORDER)):
            have = [p for p in ps if by.get((model, task, p, m))]
            if len(have) < 2:
                continue
            lo_p, hi_p = have[0], have[-1]
            cmp = _compare(f"{_where(model, task, models)}: {pretty('method', m)}, p = {hi_p:g} vs {lo_p:g}",
                           f"p={lo_p:g}", f"p={hi_p:g}", by[(model, task, lo_p, m)], by[(model, task, hi_p, m)], "hs")
            d.comparisons += [cmp] if cmp else []
        for p in ps:
            cw = by.get((model, task, p, CWAC), [])
            others = [m for m in _baselines({k[3] for k in by if k[:3] == (model, task, p)})]
            if not cw:
                d.missing.append(f"{_where(model, task, models, p)}: CWAC")
                continue
            for m in others:
                cmp = _compare(f"{_where(model, task, models, p)}: {pretty('method', m)}", "CWAC",
                               pretty("method", m), cw, by[(model, task, p, m)], "hs")
                d.comparisons += [cmp] if cmp else []
    if not ratio_pairs:
        d.missing.append("no task has records at two harmful ratios or more")

    # Evidence for the failing comparisons.
    for cl in (a, c, d):
        for cmp in cl.comparisons:
            if cmp.verdict == FAILS and cmp.a == "CWAC":
                cmp.evidence = flagged_vs_refused(cmp.ra, cmp.rb)
    for cmp in b.comparisons:
        if cmp.verdict == FAILS:
            cmp.evidence = wrong_vs_right(cmp.rb, cmp.ra)
    return [a, b, c, d]


# ---------------------------------------------------------------- rendering


def _num(x: float) -> str:
    return f"{x:+.1f}"


def _per_seed(est: Estimate, a: str, b: str) -> str:
    return "; ".join(f"s{s}: {va:.1f} / {vb:.1f}" for s, (va, vb) in sorted(est.per_seed.items())) + f" ({a} / {b})"


def _short(s, n: int) -> str:
    s = " ".join(str(s or "").split())
    s = s.replace("|", "\\|")
    return s if len(s) <= n else s[: n - 1] + "…"


def claims_markdown(claims: list[Claim], context: str) -> str:
    """The "Claims" section: a summary table, then each claim with its comparisons and evidence."""
    lines = ["## Claims", "",
             f"The paper's four qualitative claims (docs/method.md §7), checked from the records by "
             f"`cwac/reports/claims.py`. {context} Δ is in percentage points with its 95% interval from a paired "
             f"bootstrap ({N_BOOT} replicates, RNG seed {BOOT_SEED}): each replicate draws the seeds with replacement "
             "and, within each seed, the prompts (HS) or FA rows with replacement, paired across the two methods; a "
             "strict claim holds when the interval excludes 0 in its favour, fails when it excludes 0 against it, "
             f"and is a tie within noise otherwise (claim b: the interval inside ±{FA_MARGIN:g}). With one seed the "
             "interval reflects prompt noise only.", "",
             "| Claim | Verdict | Comparisons (holds / tie / fails) | Not run |", "|:--|:--|--:|:--|"]
    for cl in claims:
        counts = Counter(c.verdict for c in cl.comparisons)
        miss = ", ".join(cl.missing[:6]) + (f" and {len(cl.missing) - 6} more" if len(cl.missing) > 6 else "")
        partial = " (on the comparisons run)" if cl.missing and cl.comparisons else ""
        lines.append(f"| ({cl.key}) {cl.text} | **{cl.verdict}**{partial} | {counts[HOLDS]} / {counts[TIE]} / {counts[FAILS]} "
                     f"| {miss or '–'} |")
    lines.append("")
    for cl in claims:
        lines += [f"### ({cl.key}) {cl.text}: {cl.verdict}", ""]
        if not cl.comparisons:
            lines += ["Not run: no records for its comparisons"
                      + (f" ({', '.join(cl.missing)})." if cl.missing else "."), ""]
            continue
        lines += [f"| Comparison | Δ = {cl.quantity} [95% CI] | per seed | paired items | verdict |",
                  "|:--|--:|:--|--:|:--|"]
        for c in cl.comparisons:
            e = c.est
            items_txt = str(e.n_items) if e.prompt_level else "metric only"
            lines.append(f"| {c.label} | {_num(e.diff)} [{_num(e.lo)}, {_num(e.hi)}] | {_per_seed(e, c.a, c.b)} "
                         f"| {items_txt} | {c.verdict} |")
        lines.append("")
        if cl.missing:
            lines += ["Not run: " + ", ".join(cl.missing) + ".", ""]
        failing = [c for c in cl.comparisons if c.verdict == FAILS]
        if failing:
            lines += ["Evidence for the failing comparisons (per-seed numbers above; answers cut to 160 characters):", ""]
            for c in failing:
                if not c.evidence:
                    lines.append(f"- {c.label}: no paired samples to show (records without sample files, "
                                 "or the difference is not in single prompts)")
                    continue
                what = "CWAC wrong, SFT right" if cl.key == "b" else f"CWAC answers (flagged), {c.b} refuses"
                lines += [f"- {c.label} ({what}):", ""]
                for ev in c.evidence:
                    lines.append(f"  - seed {ev['seed']}, {ev['set']}: “{_short(ev['prompt'], 120)}” — CWAC: "
                                 f"“{_short(ev['cwac'], 160)}” — {c.b if cl.key != 'b' else 'SFT'}: "
                                 f"“{_short(ev['other'], 160)}”")
                lines.append("")
    return "\n".join(lines) + "\n"
