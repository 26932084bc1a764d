"""The held-in harmful prompt pool of CWAC and its deterministic split.

docs/method.md §3.2/§4.3: the weight subspace and the latent baselines come from harmful prompts
that the aligned model refuses, disjoint from every evaluation prompt. Our source is
``held_in_harmful_prompts()`` (AdvBench + refusal_direction ``harmful_train`` minus every
evaluation set, disjointness asserted). It is shuffled once with ``prompts.seed`` and split:

* ``heldout``: the first ``n_heldout`` prompts. Diagnostics only (drift on unseen harmful
  prompts); never used for calibration, SAE training or regularisation.
* ``train``: the rest (capped by ``n_train``). ``calibration`` = its first ``n_calibration``
  prompts (weight subspace); ``reg`` = all of it (SAE corpus, latent selection, the pool the
  activation term cycles through).

The split is made before the refusal filter, so which prompts are held out does not depend
on the model; the filter (``filter_refused``, [inferred] keyword judge on a short greedy
answer) then drops prompts the aligned model does not refuse. It is an artifact keyed by the
model, so a sweep generates once. When fewer than ``min_refused_fraction`` are refused (an
un-aligned or tiny model) the filter is not applied and the record says so.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from cwac.data.examples import Example
from cwac.data.harmful import assert_disjoint, held_in_harmful_prompts
from cwac.generation import greedy_generate
from cwac.refusal import is_refusal
from cwac.utils import stable_hash

log = logging.getLogger(__name__)


def model_identity(path: str) -> dict:
    """A key for the model the offline pieces are computed from: its artifact hash when it is
    one of ours (robust to moving the artifacts folder), else the path / hub id."""
    meta = Path(path) / "artifact.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return {"artifact": f"{m['kind']}/{m['hash']}"}
    return {"path": str(path)}


def formatter_identity(formatter) -> dict:
    tmpl = getattr(formatter.tok, "chat_template", None) if formatter.style == "chat" else None
    return {"style": formatter.style, "system_prompt": formatter.system_prompt,
            "template": stable_hash(tmpl) if tmpl else None}


@dataclass
class PromptPool:
    calibration: list[str]
    reg: list[str]
    heldout: list[str]
    info: dict = field(default_factory=dict)

    def hashes(self) -> dict:
        return {"calibration": stable_hash(self.calibration), "reg": stable_hash(self.reg),
                "heldout": stable_hash(self.heldout)}


def split_held_in(pcfg: DictConfig) -> tuple[list[str], list[str]]:
    """(heldout candidates, train candidates) before any refusal filtering."""
    prompts = held_in_harmful_prompts()
    random.Random(pcfg.seed).shuffle(prompts)
    n_h = int(pcfg.n_heldout)
    if n_h >= len(prompts):
        raise ValueError(f"prompts.n_heldout={n_h} leaves no training prompts (only {len(prompts)} held-in prompts)")
    heldout, train = prompts[:n_h], prompts[n_h:]
    if pcfg.n_train:
        train = train[: int(pcfg.n_train)]
    return heldout, train


def _refusal_flags(model, tok, formatter, prompts: list[str], pcfg: DictConfig, out: Path) -> dict:
    answers, _ = greedy_generate(model, tok, formatter, [Example(p) for p in prompts], int(pcfg.refusal_max_new_tokens),
                                 batch_size=int(pcfg.batch_size), progress=False, desc="cwac refusals")
    rows = [{"prompt": p, "answer": a, "refused": is_refusal(a)} for p, a in zip(prompts, answers)]
    (out / "refusals.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    n = sum(r["refused"] for r in rows)
    return {"n_prompts": len(rows), "n_refused": n, "refused_fraction": n / max(1, len(rows)),
            "judge": "keyword (cwac.refusal.is_refusal)", "max_new_tokens": int(pcfg.refusal_max_new_tokens)}


def build_pool(pcfg: DictConfig, model, tok, formatter, store, model_path: str) -> PromptPool:
    """The calibration / regularisation / held-out prompts for this model (see module doc)."""
    heldout, train = split_held_in(pcfg)
    info: dict = {"seed": int(pcfg.seed), "candidates": {"heldout": len(heldout), "train": len(train)},
                  "filter_refused": bool(pcfg.filter_refused)}
    if pcfg.filter_refused:
        cand = heldout + train
        key = {"model": model_identity(model_path), "format": formatter_identity(formatter),
               "prompts": stable_hash(cand), "max_new_tokens": int(pcfg.refusal_max_new_tokens), "judge": "keyword"}
        path = store.get_or_build("cwac_refusals", key,
                                  lambda out: _refusal_flags(model, tok, formatter, cand, pcfg, out))
        refused = {r["prompt"] for r in json.loads((path / "refusals.json").read_text()) if r["refused"]}
        frac = len(refused) / max(1, len(cand))
        info["refusal_artifact"] = str(path)
        info["refused_fraction"] = round(frac, 4)
        if frac >= float(pcfg.min_refused_fraction):
            heldout = [p for p in heldout if p in refused]
            train = [p for p in train if p in refused]
            info["filter_applied"] = True
        else:
            info["filter_applied"] = False
            log.warning("CWAC: the model refuses only %.0f%% of the held-in harmful prompts (< min_refused_fraction="
                        "%.2f); using all of them unfiltered. Expected for an un-aligned or tiny model.",
                        100 * frac, float(pcfg.min_refused_fraction))
    n_cal = int(pcfg.n_calibration)
    calibration = train[:n_cal]
    if len(calibration) < n_cal:
        log.warning("CWAC: only %d calibration prompts available (asked for %d)", len(calibration), n_cal)
    if not calibration or not train or not heldout:
        raise ValueError(f"CWAC prompt pool is empty after filtering (calibration {len(calibration)}, reg "
                         f"{len(train)}, heldout {len(heldout)}); lower prompts.n_heldout or set "
                         "prompts.filter_refused=false")
    assert_disjoint(calibration + train + heldout)
    assert not set(heldout) & set(train), "held-out prompts leaked into the training part"
    info.update({"n_calibration": len(calibration), "n_reg": len(train), "n_heldout": len(heldout)})
    pool = PromptPool(calibration, train, heldout, info)
    info["hashes"] = pool.hashes()
    return pool
