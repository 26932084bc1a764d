"""Read run folders into table rows: one ``Result`` per complete fine-tuning record.

Everything here comes from the files a run writes (``record.json``, ``started.json``,
``train_log.jsonl``), never from W&B. A record counts only when its status is
``complete`` and its stage is ``finetune``; failed records and killed runs (a
``started.json`` with no record) are listed in the coverage report instead.

A cell is identified by its axes, read from ``record["config"]``: model, task, harmful
ratio p, method and seed. Two records that share the axes but differ anywhere else must
not be averaged together, so every record also gets

* a **setting**: the hash of its config without the axes (budget sizes, training and
  evaluation protocol, judge, alignment recipe) and of its organism version (the aligned
  artifact's key, ``cwac.reports.organism``); each setting gets its own tables, so records of two
  organism versions never share one;
* **variant labels** for the axes whose node differs from the most common node of that
  name (e.g. a CWAC run with another lambda becomes ``CWAC [lam=1.0]``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cwac.records import HASH_NEUTRAL
from cwac.reports.organism import organism_key
from cwac.utils import stable_hash

log = logging.getLogger(__name__)

# Config keys that never change what a cell computes, or that are an axis (handled apart).
NON_SEMANTIC = ("paths", "logger", "skip_complete", "sweep_name", "offline", "threads", "host_allocator",
                "eval.progress", "training.progress",
                # how often training checkpoints itself (cwac.resume): out of the config hash as well
                "training.checkpoint_minutes", "alignment.training.checkpoint_minutes")
AXIS_NODES = ("model", "task", "method", "alignment.method")
# ``training.lr`` is an axis of the learning-rate table only; the other tables keep the setting's
# most common value (``Result.lr``).
AXES = ("seed", "stage", "harmful.ratio", "training.lr", *AXIS_NODES)


@dataclass
class Result:
    """One complete fine-tuning record, reduced to what tables and plots need."""

    model: str          # model label (name, plus a variant suffix when needed)
    task: str
    p: float
    method: str         # method label (alignment-stage method folded in, plus a variant suffix)
    seed: int
    setting: str        # hash of the config without the axes
    hs: float | None
    fa: float | None
    over_refusal: float | None
    run_dir: Path
    finished: str
    config: dict = field(repr=False)
    git: dict = field(default_factory=dict, repr=False)
    timings: dict = field(default_factory=dict, repr=False)   # record["timings"]: seconds per phase
    host: dict = field(default_factory=dict, repr=False)      # record["host"]: CPU, ISA flags, threads, GPU
    organism: str = ""  # the aligned artifact's key (cwac.reports.organism); "none" without our alignment
    lr: float | None = None                                   # training.lr
    metrics: dict = field(default_factory=dict, repr=False)   # record["metrics"]
    build: dict | None = field(default=None, repr=False)      # the aligned build it started from (build_of)


@dataclass
class Coverage:
    """What a runs folder holds besides the usable records."""

    complete: int = 0
    skipped_stage: int = 0                                   # complete records of stage=align
    aligned: list[dict] = field(default_factory=list)         # those records (``_run_dir`` added)
    failed: list[dict] = field(default_factory=list)          # {"cell", "run_dir", "error"}
    unfinished: list[dict] = field(default_factory=list)      # started.json without a record
    duplicates: list[dict] = field(default_factory=list)      # superseded records of the same cell


def stage_of(record: dict) -> str:
    """``finetune`` or ``align``: the stage a record ran (older records have it in their config only)."""
    return str(record.get("stage", node(record, "config").get("stage")))


def build_of(record: dict) -> dict | None:
    """``{"artifact", "id", "weights", "host", "created"}`` of the aligned build a record started
    from (or built, for a ``stage=align`` record); None for a record without our alignment stage.

    A build is named by its first and last training loss, which every build's meta holds: builds of
    other floats have never shared them (they part in the 7th digit), and the same recipe built on the
    same ISA at the same thread count has repeated them exactly, weights and all (docs/organism.md,
    "One key, two builds"). ``weights``, the first 12 hex digits of the weights' sha256, is there for
    builds made since the digest existed; naming by it alone would split one build in two."""
    art = (record.get("info") or {}).get("alignment") or {}
    meta = art.get("meta") or {}
    if not art.get("hash"):
        return None
    weights = meta["weights_sha256"][:12] if meta.get("weights_sha256") else None
    if meta.get("loss_first") is not None and meta.get("loss_last") is not None:
        ident = f"losses {meta['loss_first']:.7f} / {meta['loss_last']:.7f}"
    elif weights:
        ident = f"weights {weights}"
    else:
        ident = f"built {art.get('created', '?')}"
    return {"artifact": str(art["hash"]), "id": ident, "weights": weights, "host": art.get("host"),
            "created": art.get("created")}


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _drop(flat: dict, prefixes) -> dict:
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


def setting_of(config: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The part of a config that is neither an axis nor bookkeeping (flattened); a key added after
    records existed counts only away from the value every earlier run computed with
    (``cwac.records.HASH_NEUTRAL``, the config hash's rule)."""
    flat = _drop(flatten(config), (*NON_SEMANTIC, *AXES, *ignore))
    for key, v in HASH_NEUTRAL.items():
        if key in flat and type(flat[key]) is type(v) and flat[key] == v:
            del flat[key]
    return flat


def node(config: dict, path: str) -> dict:
    cur = config
    for part in path.split("."):
        cur = cur.get(part, {}) if isinstance(cur, dict) else {}
    return cur if isinstance(cur, dict) else {}


def _iter_run_dirs(roots: list[Path]):
    for root in roots:
        for started in sorted(Path(root).rglob("started.json")):
            yield started.parent
        for rec in sorted(Path(root).rglob("record.json")):
            if not (rec.parent / "started.json").exists():  # records copied without their started.json
                yield rec.parent


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# Config groups whose nodes are compared with the group's own YAML (``conf/<group>/<name>.yaml``)
# rather than with the most common node: path in the record -> Hydra override prefix.
DEFAULT_REFERENCED = {"method": "method", "alignment.method": "method@alignment.method"}


def default_node(path: str, name: str) -> dict | None:
    """The node ``path`` of the project's config with option ``name`` and nothing else changed
    (the method's documented defaults), or None when it cannot be composed (an option that no
    longer exists, a records folder from another checkout)."""
    if path not in DEFAULT_REFERENCED:
        return None
    from omegaconf import OmegaConf

    from cwac.utils import compose_config

    try:
        cfg = compose_config(f"{DEFAULT_REFERENCED[path]}={name}")
        return OmegaConf.to_container(OmegaConf.select(cfg, path), resolve=True)  # type: ignore[return-value]
    except Exception as e:  # noqa: BLE001 - any failure falls back to the modal node
        log.debug("no default node for %s=%s: %s", path, name, e)
        return None


def _variant_labels(records: list[dict], path: str, ignore: tuple[str, ...]) -> list[str]:
    """Name of each record's ``path`` node, with ``[k=v, ...]`` when it differs from the
    reference node of that name, so that two CWAC configurations never share a row. The
    reference is the option's own YAML for methods (a run with the documented defaults is never
    the one labelled), else the most common node among the records."""
    def strip(n: dict) -> dict:
        return {k: v for k, v in flatten(n).items() if not any(k == i or k.startswith(i + ".") for i in ignore)}

    nodes = [strip(node(r["config"], path)) for r in records]
    keyed = [stable_hash(n) for n in nodes]
    by_name: dict[str, Counter] = defaultdict(Counter)
    for n, h in zip(nodes, keyed):
        by_name[str(n.get("name"))][h] += 1
    modal, from_yaml = {}, set()
    for name, counts in by_name.items():
        default = default_node(path, name)
        if default is not None:
            modal[name] = strip(default)
            from_yaml.add(name)
            continue
        h = counts.most_common(1)[0][0]
        modal[name] = next(n for n, k in zip(nodes, keyed) if k == h)
    out = []
    for n in nodes:
        name = str(n.get("name"))
        ref = modal[name]
        # Against the YAML, keys a record lacks (options added after it ran) are not differences.
        keys = set(n) if name in from_yaml else set(n) | set(ref)
        diff = sorted(k for k in keys if n.get(k) != ref.get(k))
        if not diff:
            out.append(name)
        elif len(diff) <= 3:
            out.append(f"{name} [{', '.join(f'{k}={n.get(k)}' for k in diff)}]")
        else:
            out.append(f"{name} [{stable_hash(n, 6)}]")
    return out


def method_label(config: dict, method: str, align_method: str) -> str:
    """Fold an alignment-stage defence (Vaccine) into the row label: ``vaccine`` when the
    fine-tuning method is plain SFT or the same method (``method=vaccine
    method@alignment.method=vaccine``), ``vaccine+<method>`` otherwise. Only models that run
    our alignment stage (``model.align``) have one."""
    name = str(node(config, "alignment.method").get("name", "sft"))
    if not node(config, "model").get("align") or name == "sft":
        return method
    if method == "sft":
        return align_method
    if method.partition(" [")[0] == name and align_method == name:
        return method
    return f"{align_method}+{method}"


def _identity(rec: dict, run_dir: Path) -> tuple:
    """The same run read twice (from ``runs/`` and from the archive ``results/records/``) has the
    same identity: its run id, or, for records without one, its folder name and end time."""
    if rec.get("run_id"):
        return ("run_id", rec["run_id"])
    return ("folder", run_dir.name, rec.get("config_hash"), rec.get("finished"))


def load_results(roots: list[str | Path], ignore: tuple[str, ...] = ()) -> tuple[list[Result], Coverage]:
    """Complete fine-tuning records under ``roots`` (searched recursively) and the coverage. A
    record found under two roots (a runs folder and the archive) counts once.

    Args:
        roots: runs folders (``paths.runs``), each holding ``<cell>-<hash>/record.json``.
        ignore: extra dotted config keys to leave out of the setting and variant comparison
            (e.g. ``eval.batch_size`` when batch size should not split tables).
    """
    cov = Coverage()
    seen: set[Path] = set()
    identities: set[tuple] = set()
    records: list[dict] = []
    for run_dir in _iter_run_dirs([Path(r) for r in roots]):
        run_dir = run_dir.resolve()
        if run_dir in seen:
            continue
        seen.add(run_dir)
        if run_dir.name == "rerun" or "history" in run_dir.parts[-3:-1]:   # an attempt in progress, or superseded
            continue
        rec = _read_json(run_dir / "record.json")
        if rec is not None:
            ident = _identity(rec, run_dir)
            if ident in identities:
                continue
            identities.add(ident)
        if rec is None:
            started = _read_json(run_dir / "started.json") or {}
            cov.unfinished.append({"cell": started.get("cell", run_dir.name), "run_dir": str(run_dir),
                                   "started": started.get("started")})
            continue
        if rec.get("status") != "complete":
            cov.failed.append({"cell": rec.get("cell", run_dir.name), "run_dir": str(run_dir),
                               "error": rec.get("error")})
            continue
        if stage_of(rec) != "finetune":
            cov.skipped_stage += 1
            rec["_run_dir"] = run_dir
            cov.aligned.append(rec)
            continue
        rec["_run_dir"] = run_dir
        records.append(rec)

    models = _variant_labels(records, "model", ignore)
    tasks = _variant_labels(records, "task", ignore)
    methods = _variant_labels(records, "method", ignore)
    aligns = _variant_labels(records, "alignment.method", ignore)
    results: dict[tuple, Result] = {}
    for rec, m, t, me, al in zip(records, models, tasks, methods, aligns):
        cfg = rec["config"]
        metrics = rec.get("metrics", {})
        res = Result(model=m, task=t, p=float(node(cfg, "harmful").get("ratio", 0.0)),
                     method=method_label(cfg, me, al), seed=int(rec.get("seed", cfg.get("seed", 0))),
                     setting=stable_hash({"config": setting_of(cfg, ignore), "organism": organism_key(rec)}, 6),
                     hs=metrics.get("hs"), fa=metrics.get("fa"),
                     over_refusal=metrics.get("over_refusal"), run_dir=rec["_run_dir"],
                     finished=str(rec.get("finished", "")), config=cfg, git=rec.get("git") or {},
                     timings=rec.get("timings") or {}, host=rec.get("host") or {}, organism=organism_key(rec),
                     lr=node(cfg, "training").get("lr"), metrics=metrics, build=build_of(rec))
        key = (res.setting, res.model, res.task, res.p, res.lr, res.method, res.seed)
        old = results.get(key)
        if old is not None:  # same cell twice (e.g. two runs folders): keep the newest, report the other
            keep, drop = (res, old) if res.finished >= old.finished else (old, res)
            results[key] = keep
            cov.duplicates.append({"cell": rec.get("cell"), "kept": str(keep.run_dir), "dropped": str(drop.run_dir)})
            continue
        results[key] = res
    cov.complete = len(results)
    return list(results.values()), cov


def setting_diff(results: list[Result], setting: str, reference: str, ignore: tuple[str, ...] = ()) -> dict:
    """Config keys whose value differs between two settings: {key: (value, reference value)}."""
    a = next(r for r in results if r.setting == setting)
    b = next(r for r in results if r.setting == reference)
    fa, fb = setting_of(a.config, ignore), setting_of(b.config, ignore)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def read_train_log(run_dir: Path, stage: str = "finetune") -> list[dict]:
    """Rows of ``train_log.jsonl`` for ``stage``, keys without the stage prefix.

    A rerun of a killed cell appends to the same log, so only the last run (the rows after
    the last time the step counter went back) is returned.
    """
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    rows: list[dict] = []
    prefix = f"{stage}/"
    last_step = None
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a killed run
        vals = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        step = raw.get("step")
        if not vals or step is None:
            continue
        if last_step is not None and step <= last_step:
            rows = []
        rows.append({"step": step, **vals})
        last_step = step
    return rows
