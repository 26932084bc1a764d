"""Data artifacts shared by the data-side baselines (SafeInstr's safety rows, Lisa's alignment pool).

Both are built once per recipe by ``ArtifactStore`` and reused by every cell. Harmful prompts
come only from ``held_in_harmful_prompts()`` (disjoint from every HS evaluation set; asserted
again here) and refusals from the alignment stage's bank (``cwac.alignment.refusal_text``), so
the safety data speaks with the same voice as the aligned model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from omegaconf import OmegaConf

from cwac.data.examples import Example
from cwac.data.harmful import assert_disjoint, held_in_harmful_prompts

ROWS = "rows.jsonl"


def _write(out: Path, rows: list[Example]) -> dict:
    with open(out / ROWS, "w") as f:
        for e in rows:
            f.write(json.dumps(e.to_dict()) + "\n")
    return {"n_rows": len(rows), "sources": sorted({e.source for e in rows})}


def _read(folder: Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in (Path(folder) / ROWS).read_text().splitlines() if line.strip()]


def _store(ctx):
    if ctx.store is None:
        raise ValueError("this method needs an ArtifactStore in the TrainContext (ctx.store)")
    return ctx.store


def safety_rows(ctx, n: int, seed: int) -> list[Example]:
    """``n`` (harmful instruction -> refusal) rows, SafeInstr-style (Bianchi et al., arXiv 2309.07875).

    Prompts: a seeded sample of the held-in harmful pool; refusals: ``refusal_text(prompt, seed)``.
    """
    from cwac.alignment import refusal_text

    def build(out: Path) -> dict:
        pool = held_in_harmful_prompts()
        if n > len(pool):
            raise ValueError(f"SafeInstr asks for {n} safety rows but only {len(pool)} held-in harmful prompts "
                             "exist; lower method.count / method.fraction")
        prompts = random.Random(seed).sample(pool, n)
        assert_disjoint(prompts)
        return _write(out, [Example(p, "", refusal_text(p, seed), "safety_refusal") for p in prompts])

    return _read(_store(ctx).get_or_build("safety_rows", {"n": n, "seed": seed, "pool": "held_in_harmful",
                                                           "refusals": "cwac.alignment.refusal_text"}, build))


def alignment_pool(ctx) -> list[Example]:
    """The alignment recipe's rows (held-in harmful -> refusal + Alpaca -> answer), as an artifact."""
    from cwac.alignment import alignment_rows

    acfg = ctx.alignment
    recipe = {k: OmegaConf.to_container(acfg, resolve=True)[k] for k in ("n_harmful", "n_harmless", "max_answer_chars", "seed")}
    if acfg.extra_harmful_sets:   # only when set, so recipes without it keep their key
        recipe["extra_harmful_sets"] = list(acfg.extra_harmful_sets)

    def build(out: Path) -> dict:
        return _write(out, alignment_rows(acfg, acfg.seed))   # alignment_rows asserts disjointness itself

    return _read(_store(ctx).get_or_build("alignment_rows", recipe, build))
