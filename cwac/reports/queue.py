"""The cell queue and its progress, regenerated from the records: ``sweeps/queue.md``.

    python -m cwac.reports.queue                       # sweeps/queue.yaml + runs/, results/records/ -> sweeps/queue.md
    python -m cwac.reports.queue --runs runs /scratch/runs --queue sweeps/queue.yaml --out sweeps/queue.md

``sweeps/queue.yaml`` lists sections (a table each, in the order they run), each a grid of Hydra
overrides. Every cell is composed with Hydra's compose API into the config a ``python run.py
<overrides>`` launch would run, and its config hash (``cwac.records.config_hash``) is looked up
among the records: done (a complete record), failed, started (killed, or running now) or to run.
A cell that an earlier section lists (same hash) is counted there once. The minutes a missing cell
needs are estimated from the complete records of the same task and method (their median
``timings.total_seconds``), else of the same task, else of all records.

Above the cells stand the **aligned builds** they wait for: the organism (``python run.py
stage=align``), which every cell starts from, and the aligned artifact of each alignment-stage
defence that a missing cell names (``method@alignment.method=<m>``). Artifacts are not committed, so
a fresh machine builds each one once before its cells. A build's minutes come from its own align
record, else from the organism's build time times the defence's ``align_cost`` in the queue file
(its passes a step against the organism's one).

Composing ~150 cells one by one takes minutes, so each group override (``task=agnews``,
``method=cwac``, ...) is composed once on its own, and a cell's config is the default config with
the top-level nodes each of its overrides changed put in, and its plain values (``seed``,
``training.lr``) set; a cell whose overrides change the same top-level node is composed whole.
``tests/cwac/reports/test_queue.py`` checks that both give the same hash.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from cwac.records import config_hash
from cwac.utils import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
QUEUE_YAML = ROOT / "sweeps" / "queue.yaml"
QUEUE_MD = ROOT / "sweeps" / "queue.md"
DEFAULT_ROOTS = (ROOT / "runs", ROOT / "results" / "records")


@dataclass
class Cell:
    overrides: list[str]
    section: int
    chash: str | None = None
    error: str | None = None           # the compose error, when the cell does not compose
    status: str = "to run"             # done | failed | started | to run | does not compose
    minutes: float | None = None       # measured (done) or estimated (missing)
    task: str = ""
    method: str = ""
    first_in: int | None = None        # the earlier section that lists the same cell


@dataclass
class Build:
    """An aligned artifact that cells need: the organism, or an alignment-stage defence's."""

    overrides: list[str]               # the ``python run.py`` overrides that build it
    chash: str | None = None           # the align record's config hash
    done: bool = False                 # an align record exists (it was built once; a fresh machine rebuilds)
    minutes: float | None = None       # from its align record, else estimated
    cells: int = 0                     # missing cells that wait for it


@dataclass
class Section:
    name: str
    run: list[str]
    cells: list[Cell] = field(default_factory=list)


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def expand(spec: dict) -> list[Section]:
    """Sections of ``sweeps/queue.yaml`` with their cells' overrides, grid order outer key first."""
    extra = spec.get("extra") or {}
    out = []
    for i, sec in enumerate(spec["sections"]):
        s = Section(sec["name"], list(sec.get("run") or []))
        keys = list(sec["grid"])
        for values in itertools.product(*(sec["grid"][k] for k in keys)):
            ov = [f"{k}={_fmt(v)}" for k, v in zip(keys, values)]
            choice = dict(zip(keys, values))
            ov += list(extra.get(str(choice.get("method")), []))
            s.cells.append(Cell(ov, i, task=str(choice.get("task", "")), method=str(choice.get("method", ""))))
        out.append(s)
    return out


def _value(text: str):
    """A plain override's value as Hydra reads it: int, float (``1e-05`` too), else YAML."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


class Composer:
    """Configs of many cells from few Hydra compositions (module docstring)."""

    def __init__(self, conf_dir: str | Path = CONF_DIR):
        from hydra import initialize_config_dir

        self._ctx = initialize_config_dir(config_dir=str(conf_dir), version_base="1.3")
        self._ctx.__enter__()
        self.conf_dir = Path(conf_dir)
        self._base = OmegaConf.to_container(self._compose([]), resolve=False)
        self._parts: dict[str, tuple[dict, set[str]]] = {}

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)

    def _compose(self, overrides: list[str]) -> DictConfig:
        from hydra import compose

        return compose(config_name="config", overrides=overrides)

    def _is_group(self, override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return "@" in key or (self.conf_dir / key).is_dir()

    def _part(self, override: str) -> tuple[dict, set[str]]:
        """The config with ``override`` alone (as a container) and the top-level keys it changes."""
        if override not in self._parts:
            cfg = OmegaConf.to_container(self._compose([override]), resolve=False)
            changed = {k for k in set(cfg) | set(self._base) if cfg.get(k) != self._base.get(k)}
            self._parts[override] = (cfg, changed)
        return self._parts[override]

    def compose(self, overrides: list[str]) -> DictConfig:
        groups = [o for o in overrides if self._is_group(o)]
        values = [o for o in overrides if not self._is_group(o)]
        parts = [self._part(o) for o in groups]
        touched = [k for _, changed in parts for k in changed]
        if len(touched) != len(set(touched)):        # two overrides change one node: Hydra merges them
            return self._compose(overrides)
        merged = copy.deepcopy(self._base)
        for src, changed in parts:
            for k in changed:
                if k in src:
                    merged[k] = copy.deepcopy(src[k])
                else:
                    merged.pop(k, None)
        cfg = OmegaConf.create(merged)
        for o in values:
            k, v = o.split("=", 1)
            OmegaConf.update(cfg, k.lstrip("+"), _value(v), merge=False)
        return cfg


def record_index(roots) -> dict[str, dict]:
    """{config hash: what the runs folders hold for it}: status, seconds, finished."""
    out: dict[str, dict] = {}
    rank = {"complete": 3, "failed": 2, "started": 1}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("started.json")) + sorted(root.rglob("record.json")):
            if f.parent.name == "rerun" or "history" in f.parts[-4:-1]:
                continue
            try:
                rec = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            h = rec.get("config_hash")
            if not h:
                continue
            status = rec.get("status", "started") if f.name == "record.json" else "started"
            timings = rec.get("timings") or {}
            row = {"status": status, "seconds": timings.get("total_seconds"),
                   "build_seconds": timings.get("start_model_seconds"), "finished": rec.get("finished"),
                   "cell": rec.get("cell")}
            if h not in out or rank.get(status, 0) > rank.get(out[h]["status"], 0):
                out[h] = row
    return out


def fill(sections: list[Section], records: dict[str, dict], composer: Composer | None = None) -> None:
    """Compose every cell, find its status, and estimate the minutes of the missing ones."""
    own = composer is None
    composer = composer or Composer()
    try:
        first: dict[str, int] = {}
        for s in sections:
            for c in s.cells:
                try:
                    c.chash = config_hash(composer.compose(c.overrides))
                except Exception as e:  # noqa: BLE001 - a cell the config cannot express yet is listed as such
                    c.error, c.status = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "does not compose"
                    continue
                if c.chash in first and first[c.chash] != c.section:
                    c.first_in = first[c.chash]
                first.setdefault(c.chash, c.section)
                rec = records.get(c.chash)
                if rec:
                    c.status = {"complete": "done"}.get(rec["status"], rec["status"])
                    if rec["status"] == "complete" and rec.get("seconds") is not None:
                        c.minutes = rec["seconds"] / 60
    finally:
        if own:
            composer.close()
    done = [c for s in sections for c in s.cells if c.status == "done" and c.minutes is not None]

    def median(cs):
        return statistics.median(c.minutes for c in cs) if cs else None

    for s in sections:
        for c in s.cells:
            if c.status == "done":
                continue
            c.minutes = (median([d for d in done if (d.task, d.method) == (c.task, c.method)])
                         or median([d for d in done if d.task == c.task]) or median(done))


def _alignment_overrides(cell: Cell) -> tuple[str, ...]:
    return tuple(o for o in cell.overrides if o.startswith(("method@alignment.method=", "alignment.")))


def builds(sections: list[Section], records: dict[str, dict], align_cost: dict[str, float],
           composer: Composer | None = None) -> list[Build]:
    """The organism's build, then each alignment-stage defence's that a missing cell needs
    (module docstring), with the missing cells that wait for each."""
    own = composer is None
    composer = composer or Composer()
    missing = [c for c in _unique(sections) if c.status != "done"]
    wanted = {(): len(missing)}
    for c in missing:
        if _alignment_overrides(c):
            wanted[_alignment_overrides(c)] = wanted.get(_alignment_overrides(c), 0) + 1
    out = []
    try:
        for extra, n in wanted.items():
            b = Build(["stage=align", *extra], cells=n)
            b.chash = config_hash(composer.compose(b.overrides))
            rec = records.get(b.chash) or {}
            b.done = rec.get("status") == "complete"
            if b.done and rec.get("seconds") is not None:
                b.minutes = rec["seconds"] / 60
            out.append(b)
    finally:
        if own:
            composer.close()
    organism = records.get(out[0].chash) or {}
    if organism.get("build_seconds") is not None and organism.get("seconds") is not None:
        build, rest = organism["build_seconds"] / 60, (organism["seconds"] - organism["build_seconds"]) / 60
        for b in out[1:]:
            name = b.overrides[1].split("=", 1)[1] if b.overrides[1].startswith("method@") else None
            if b.minutes is None and name in align_cost:
                b.minutes = float(align_cost[name]) * build + rest
    return out


def builds_markdown(blds: list[Build]) -> list[str]:
    if not blds or not blds[0].cells:
        return []
    lines = ["## Aligned builds the missing cells wait for", "",
             "Artifacts are not committed: a fresh machine builds each of these once, before the cells that need it "
             "(a cell that finds its artifact missing builds it itself, inside the cell). Minutes: from the build's own "
             "align record, else ~ the organism's build times the defence's `align_cost` (sweeps/queue.yaml).", "",
             "| build | built before | minutes | missing cells waiting | config hash |", "|:--|:--|--:|--:|:--|"]
    for b in blds:
        mins = "–" if b.minutes is None else (f"{b.minutes:.1f}" if b.done else f"~{b.minutes:.0f}")
        lines.append(f"| `python run.py {' '.join(b.overrides)}` | {'yes' if b.done else 'no'} | {mins} | {b.cells} "
                     f"| `{b.chash or '–'}` |")
    total = sum(b.minutes for b in blds if b.minutes is not None)
    lines += ["", f"On a fresh machine the builds take about {total:.0f} min (~{total / 60:.1f} h) before their cells"
              + (f"; {sum(b.minutes is None for b in blds)} untimed" if any(b.minutes is None for b in blds) else "")
              + ".", ""]
    return lines


def _unique(sections: list[Section]) -> list[Cell]:
    return [c for s in sections for c in s.cells if c.first_in is None]


def _minutes(cells: list[Cell]) -> str:
    missing = [c for c in cells if c.status != "done"]
    if not missing:
        return "0 min"
    known = [c.minutes for c in missing if c.minutes is not None]
    if not known:
        return "unknown"
    total = sum(known)
    txt = f"{total:.0f} min (~{total / 60:.1f} h)"
    return txt + (f" + {len(missing) - len(known)} cells untimed" if len(known) < len(missing) else "")


def progress(sections: list[Section]) -> str:
    """One line: cells done, and the compute the missing ones need."""
    cells = _unique(sections)
    done = sum(c.status == "done" for c in cells)
    if done == len(cells):
        return f"cell queue: all {done} cells done"
    timed = any(c.minutes is not None for c in cells if c.status != "done")
    return (f"cell queue: {done} of {len(cells)} cells done; the {len(cells) - done} missing need "
            + (f"about {_minutes(cells)}" if timed else "an unknown time (no complete record to time them by)"))


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def queue_markdown(sections: list[Section], queue_path: str = "sweeps/queue.yaml",
                   blds: list[Build] | None = None) -> str:
    cells = _unique(sections)
    lines = ["# Cell queue", "",
             f"Generated by `python -m cwac.reports.queue` (also run by `python -m cwac.reports.build`) from "
             f"`{queue_path}` and the records in `runs/` and `results/records/`; do not edit. Cells run in this order, "
             "section by section; a cell listed by an earlier section (same config hash) counts there.", "",
             f"**{_upper_first(progress(sections)[len('cell queue: '):])}** (estimated from the records' cell times: "
             "the median of the same task and method, else of the same task, else of all).", "",
             "| # | Section | cells | done | failed | started | to run | missing compute |",
             "|--:|:--|--:|--:|--:|--:|--:|--:|"]
    for i, s in enumerate(sections, 1):
        own = [c for c in s.cells if c.first_in is None]
        n = {k: sum(c.status == k for c in own) for k in ("done", "failed", "started")}
        todo = len(own) - sum(n.values())
        shared = len(s.cells) - len(own)
        lines.append(f"| {i} | {s.name} | {len(own)}{f' (+{shared} shared)' if shared else ''} | {n['done']} "
                     f"| {n['failed']} | {n['started']} | {todo} | {_minutes(own)} |")
    lines.append("")
    lines += builds_markdown(blds or [])
    for i, s in enumerate(sections, 1):
        lines += [f"## {i}. {s.name}", ""]
        if s.run:
            lines += ["Run (resumes: complete cells are skipped):", "", "```bash", *s.run, "```", ""]
        lines += ["| cell | status | minutes | config hash | command |", "|--:|:--|--:|:--|:--|"]
        for j, c in enumerate(s.cells, 1):
            if c.first_in is not None:
                status = f"{c.status}, in section {c.first_in + 1}"
            else:
                status = c.status if c.error is None else f"does not compose: {c.error}"
            mins = "–" if c.minutes is None else (f"{c.minutes:.1f}" if c.status == "done" else f"~{c.minutes:.0f}")
            lines.append(f"| {j} | {status} | {mins} | `{c.chash or '–'}` | `python run.py {' '.join(c.overrides)}` |")
        lines.append("")
    return "\n".join(lines)


def build_queue(roots=DEFAULT_ROOTS, queue: Path = QUEUE_YAML, out: Path | None = QUEUE_MD,
                composer: Composer | None = None) -> list[Section]:
    """Read ``queue``, find each cell's status in ``roots`` and write the markdown to ``out``."""
    spec = yaml.safe_load(Path(queue).read_text())
    sections = expand(spec)
    records = record_index(roots)
    fill(sections, records, composer)
    if out is not None:
        blds = builds(sections, records, spec.get("align_cost") or {}, composer)
        try:
            shown = Path(queue).resolve().relative_to(ROOT)
        except ValueError:
            shown = Path(queue)
        Path(out).write_text(queue_markdown(sections, str(shown), blds))
    return sections


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwac.reports.queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=[str(r) for r in DEFAULT_ROOTS],
                    help="runs folders and archives to read (default: runs/ and results/records/)")
    ap.add_argument("--queue", default=str(QUEUE_YAML), help="the queue's sections (default: sweeps/queue.yaml)")
    ap.add_argument("--out", default=str(QUEUE_MD), help="markdown to write (default: sweeps/queue.md)")
    args = ap.parse_args(argv)
    sections = build_queue([Path(r) for r in args.runs], Path(args.queue), Path(args.out))
    cells = _unique(sections)
    print(f"{sum(c.status == 'done' for c in cells)} of {len(cells)} cells done -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
