"""Which build of an aligned artifact each fine-tuning cell started from.

An aligned artifact's key names its recipe, not its floats. The same key built at another torch
thread count (or on another ISA) reduces its sums in another order, and two machines then hold
different weights under one key (docs/organism.md, "One key, two builds"). A cell's record names
the build it started from by the build's first and last training loss (``collect.build_of``), with
the weights' sha256 (``info.alignment.meta.weights_sha256``) where the build recorded it. This
section lists every artifact whose cells came from more than one build, so a table that mixes them
says so.
"""

from __future__ import annotations

from collections import defaultdict

from cwac.reports.collect import Result, build_of
from cwac.reports.tables import host_label, pretty


def _seeds(rs: list[Result]) -> str:
    """``SST-2 p = 0.1 CWAC: s42, s43; ...`` (the learning rate only where the cells have more than one)."""
    by_cell: dict[tuple, list[int]] = defaultdict(list)
    for r in rs:
        by_cell[(r.model, r.task, r.p, r.lr, r.method)].append(r.seed)
    show_lr = len({r.lr for r in rs}) > 1
    return "; ".join(f"{pretty('task', t)} p = {p:g}{f' lr {lr:g}' if show_lr else ''} {pretty('method', m)}: "
                     + ", ".join(f"s{s}" for s in sorted(seeds))
                     for (_, t, p, lr, m), seeds in sorted(by_cell.items(), key=lambda kv: str(kv[0])))


def builds_markdown(results: list[Result], aligned: list[dict]) -> str | None:
    """A table of the artifacts whose cells started from more than one build (None when none did),
    with each build's own scores where a ``stage=align`` record of that build is in ``aligned``."""
    cells: dict[str, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    info: dict[tuple[str, str], dict] = {}
    digests: dict[tuple[str, str], set[str]] = defaultdict(set)   # a build's weights sha256, where recorded
    made: dict[tuple[str, str], set[str]] = defaultdict(set)      # when each fresh machine made that build

    def note(b: dict) -> None:
        info.setdefault((b["artifact"], b["id"]), b)
        digests[(b["artifact"], b["id"])].update([b["weights"]] if b.get("weights") else [])
        made[(b["artifact"], b["id"])].update([b["created"]] if b.get("created") else [])

    for r in results:
        if r.build:
            cells[r.build["artifact"]][r.build["id"]].append(r)
            note(r.build)
    scores: dict[tuple[str, str], dict] = {}
    for rec in aligned:
        b = build_of(rec)
        if b:
            scores.setdefault((b["artifact"], b["id"]), rec.get("metrics") or {})
            note(b)
    mixed = {a: by for a, by in cells.items() if len(by) > 1}
    if not mixed:
        return None
    lines = ["### Aligned artifacts whose cells came from more than one build", "",
             "| artifact | build | built on | first built | its HS / over-refusal | cells that started from it |",
             "|:--|:--|:--|:--|:--|:--|"]
    for artifact in sorted(mixed):
        for ident in sorted(mixed[artifact], key=lambda i: min(made[(artifact, i)], default="?")):
            b, m = info[(artifact, ident)], scores.get((artifact, ident))
            times = sorted(made[(artifact, ident)])
            built = (times[0] if times else "?") + (f" (made {len(times)} times)" if len(times) > 1 else "")
            own = "–" if m is None else f"{m.get('hs', float('nan')):.1f} / {m.get('over_refusal', float('nan')):.0f}"
            sha = "".join(f"; weights {d}" for d in sorted(digests[(artifact, ident)]))
            lines.append(f"| `{artifact}` | {ident}{sha} | {host_label(b.get('host'))} | {built} | {own} "
                         f"| {_seeds(mixed[artifact][ident])} |")
    lines += ["", "One artifact key, two sets of floats: the builds ran the same recipe at another torch thread "
              "count or ISA, so their sums were reduced in another order. A table that averages such cells mixes "
              "builds as well as seeds; docs/organism.md (\"One key, two builds\") measures how far apart the "
              "builds are. A fresh machine at the same ISA and thread count repeats a build exactly, so its cells "
              "join that build's row: \"first built\" is the earliest of the build's dates, and \"made N times\" "
              "counts them. A build's own scores come from its `stage=align` record (in `results/records/` or "
              "`results/history/`).", ""]
    return "\n".join(lines)
