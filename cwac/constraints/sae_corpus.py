"""The SAE's training corpus (docs/method.md §4.1): residual-stream activations of the aligned
model after block ``l*`` on refused harmful prompts and on benign text, served chunk by chunk.

* **Harmful side**: the regularisation pool's refused prompts (``cwac.constraints.pool``) and,
  with ``sae.corpus.harmful_extra`` (``budget=paper``), more unsafe prompts of a hub split
  (BeaverTails ``30k_train``; ``extra_harmful_prompts``). Those lose every prompt of the
  evaluation, validation, alignment-only and hub evaluation sets (``30k_test``, the paper's HS
  set) and of the pool (disjointness asserted, as for the held-in pool), and keep only the
  prompts the aligned model refuses, judged as the pool is (``refused_prompts``). The paper's
  70% harmful share of ~100M tokens is far more than the ~17k tokens of the pool.
* **Benign side**: ``benign_examples`` (Alpaca, the task's rows, or a web-text stream), read row
  by row until ``(1 − harmful_fraction) · tokens`` counted tokens.
* **Chunks** (``ResidualStream``): with ``sae.corpus.chunk_tokens`` set, at most about that many
  residuals are held at once, whatever the corpus size (100M tokens at d_model 4096 would be
  1.6 TB in float32). Each chunk takes the next ``harmful_fraction · chunk_tokens`` harmful
  tokens (cycling through the harmful prompts in their order, none twice in one chunk) and the
  next ``(1 − harmful_fraction) · chunk_tokens`` benign tokens, regenerates their residuals with
  a forward pass, and serves ``mixed_batches`` from them until its benign part has been drawn
  once; then the next chunk replaces it (the old one is freed first). When the benign text is
  used up, the last chunk keeps serving. ``chunk_tokens: null`` is one chunk that holds the whole
  corpus (the CPU presets): the same tensors, batches and SAE as collecting everything at once.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cwac.constraints.sae import mixed_batches
from cwac.data.examples import Example
from cwac.data.harmful import (ALIGNMENT_ONLY_HARMFUL_SETS, EVAL_HARMFUL_SETS, HUB_EVAL_HARMFUL_SETS,
                               VALIDATION_HARMFUL_SETS, assert_disjoint, drop_eval_prompts)
from cwac.utils import normalize_prompt, stable_hash

log = logging.getLogger(__name__)

#: sets whose prompts never enter the SAE corpus from ``harmful_extra`` (the hub ones need ``offline=false``)
KEPT_OUT_OF_EXTRA = EVAL_HARMFUL_SETS + HUB_EVAL_HARMFUL_SETS + VALIDATION_HARMFUL_SETS + ALIGNMENT_ONLY_HARMFUL_SETS


# ----------------------------------------------------------------------------- more harmful prompts

def check_harmful_extra(spec, where: str = "method.sae.corpus.harmful_extra") -> None:
    """Refuse a test split: BeaverTails ``30k_test`` is the paper's HS set (docs/method.md §6.5)."""
    if "test" in str(spec.split).lower():
        raise ValueError(f"config {where}.split={spec.split!r}: a test split holds evaluation prompts (BeaverTails "
                         f"30k_test is the paper's HS set); use a train split, e.g. {where}.split=30k_train")
    if spec.n_prompts is not None and int(spec.n_prompts) < 1:
        raise ValueError(f"config {where}.n_prompts={spec.n_prompts}: must be >= 1, or null for every prompt")


def extra_harmful_prompts(spec, exclude: Sequence[str], seed: int) -> tuple[list[str], dict]:
    """The distinct unsafe prompts (``spec.safe_field`` false) of a hub split, minus ``exclude`` and
    every prompt of ``KEPT_OUT_OF_EXTRA`` (asserted), shuffled with ``seed`` and capped at
    ``spec.n_prompts``. Reads the hub (``offline=false``)."""
    from datasets import load_dataset

    check_harmful_extra(spec)
    rows = load_dataset(str(spec.dataset), spec.name, split=str(spec.split))
    banned = {normalize_prompt(p) for p in exclude}
    seen: set[str] = set()
    unsafe, prompts = 0, []
    for r in rows:
        if r[str(spec.safe_field)]:
            continue
        unsafe += 1
        p = str(r[str(spec.prompt_field)]).strip()
        k = normalize_prompt(p)
        if p and k not in seen and k not in banned:
            seen.add(k)
            prompts.append(p)
    kept, dropped = drop_eval_prompts([Example(p) for p in prompts], KEPT_OUT_OF_EXTRA)
    prompts = [e.instruction for e in kept]
    assert_disjoint(prompts, KEPT_OUT_OF_EXTRA)
    random.Random(seed).shuffle(prompts)
    if spec.n_prompts is not None:
        prompts = prompts[: int(spec.n_prompts)]
    return prompts, {"dataset": str(spec.dataset), "name": spec.name, "split": str(spec.split), "unsafe_rows": unsafe,
                     "distinct_outside_pool": len(seen), "dropped_as_evaluation": dropped,
                     "kept_out_of": list(KEPT_OUT_OF_EXTRA), "n_prompts": len(prompts)}


def refused_prompts(prompts: list[str], model, tok, formatter, pcfg, store, model_path: str) -> tuple[list[str], dict]:
    """``prompts`` the aligned model refuses, by the pool's filter (``cwac.constraints.pool``: keyword
    judge on a ``prompts.refusal_max_new_tokens`` greedy answer, an artifact keyed by the model;
    skipped when ``prompts.filter_refused`` is false or fewer than ``min_refused_fraction`` are refused)."""
    from cwac.constraints.pool import _refusal_flags, formatter_identity, model_identity

    info: dict = {"filter_refused": bool(pcfg.filter_refused)}
    if not pcfg.filter_refused or not prompts:
        return prompts, info
    key = {"model": model_identity(model_path), "format": formatter_identity(formatter),
           "prompts": stable_hash(prompts), "max_new_tokens": int(pcfg.refusal_max_new_tokens), "judge": "keyword"}
    path = store.get_or_build("cwac_refusals", key, lambda out: _refusal_flags(model, tok, formatter, prompts, pcfg, out))
    refused = {r["prompt"] for r in json.loads((path / "refusals.json").read_text()) if r["refused"]}
    frac = len(refused) / len(prompts)
    info.update({"refusal_artifact": str(path), "refused_fraction": round(frac, 4),
                 "filter_applied": frac >= float(pcfg.min_refused_fraction)})
    if not info["filter_applied"]:
        log.warning("CWAC: the model refuses only %.0f%% of the extra SAE harmful prompts (< min_refused_fraction); "
                    "using all of them unfiltered", 100 * frac)
        return prompts, info
    return [p for p in prompts if p in refused], info


# ----------------------------------------------------------------------------- chunked residuals

@dataclass
class Chunk:
    harmful: torch.Tensor          # [n_h, d] residuals of the chunk's harmful prompts
    benign: torch.Tensor           # [n_b, d]
    harmful_index: list[int]       # which harmful prompts (positions in the stream's list), in order
    last: list = field(default_factory=list)   # last-position residual of each harmful prompt (first chunk)


class ResidualStream:
    """The SAE corpus as chunks of residuals (module doc).

    Args:
        collect: ``collect(id_lists, last=None) -> [N, d]`` residuals at every counted token
            (``cwac.constraints.sae.collect_residuals`` bound to the model and layer).
        harmful_ids: token ids of every harmful prompt (the pool's first, in order).
        benign_ids: an iterator of token ids of benign rows (read lazily).
        d: the residual width (for empty sides).
        skip: positions of each sequence that are not counted (``make_batch``'s ``skip_tokens``).
        tokens, harmful_fraction: the corpus size and mix (``sae.corpus``); benign tokens stop at
            ``(1 − harmful_fraction) · tokens``.
        chunk_tokens: residuals a chunk holds (each side may overshoot by one sequence); None:
            one chunk with every harmful prompt once and every benign token.
    """

    def __init__(self, collect: Callable, harmful_ids: Sequence[Sequence[int]], benign_ids: Iterator,
                 *, d: int, skip: int, tokens: int, harmful_fraction: float, chunk_tokens: int | None):
        if chunk_tokens is not None and int(chunk_tokens) < 1:
            raise ValueError(f"config method.sae.corpus.chunk_tokens={chunk_tokens}: must be >= 1, or null to hold "
                             "the whole corpus")
        if not harmful_ids:
            raise ValueError("the SAE corpus has no harmful prompts")
        self.collect, self.harmful_ids, self.benign_ids = collect, list(harmful_ids), benign_ids
        self.d, self.skip, self.hf = d, skip, float(harmful_fraction)
        self.benign_target = int((1 - self.hf) * int(tokens))
        self.chunk_tokens = None if chunk_tokens is None else int(chunk_tokens)
        if self.chunk_tokens is None:
            self.harm_budget, self.benign_budget = math.inf, self.benign_target
        else:
            self.harm_budget = round(self.hf * self.chunk_tokens)
            self.benign_budget = self.chunk_tokens - self.harm_budget
        self._hpos = 0                 # next harmful prompt (cyclic)
        self._harm_seen = 0            # harmful prompts taken so far (passes = _harm_seen / n)
        self.benign_seen = 0           # counted benign tokens taken
        self._benign_out = self.benign_target <= 0
        self._pending = None           # a benign row read ahead (to know whether the text is used up)
        self.n_chunks = 0
        self.peak_rows = 0             # largest chunk held (residual rows)
        self.rows = {"harmful": 0, "benign": 0}   # residuals generated over every chunk
        self.benign_rows = 0           # benign sequences read

    def _count(self, ids) -> int:
        return max(0, len(ids) - self.skip)

    @property
    def done(self) -> bool:
        """No further chunk: the benign text is used up (and, without benign text, every harmful
        prompt has been in a chunk)."""
        return self._benign_out and (self.benign_target > 0 or self._harm_seen >= len(self.harmful_ids))

    def next_chunk(self, keep_last: bool = False) -> Chunk:
        n = len(self.harmful_ids)
        idx, counted = [], 0
        while len(idx) < n and counted < self.harm_budget:
            idx.append(self._hpos)
            counted += self._count(self.harmful_ids[self._hpos])
            self._hpos = (self._hpos + 1) % n
        self._harm_seen += len(idx)
        last = [None] * len(idx) if keep_last else None
        harm = self.collect([self.harmful_ids[i] for i in idx], last=last)
        ids, counted = [], 0
        while not self._benign_out and counted < self.benign_budget:
            x, self._pending = (self._pending, None) if self._pending is not None else (next(self.benign_ids, None), None)
            if x is None:
                self._benign_out = True
                break
            ids.append(x)
            counted += self._count(x)
            self.benign_seen += self._count(x)
            if self.benign_seen >= self.benign_target:
                self._benign_out = True
        if not self._benign_out:   # the chunk is full: is any benign text left for a next one?
            self._pending = next(self.benign_ids, None)
            self._benign_out = self._pending is None
        benign = self.collect(ids) if ids else torch.zeros(0, self.d)
        harm = harm if harm.dim() == 2 else torch.zeros(0, self.d)
        benign = benign if benign.dim() == 2 else torch.zeros(0, self.d)
        self.n_chunks += 1
        self.benign_rows += len(ids)
        self.rows["harmful"] += len(harm)
        self.rows["benign"] += len(benign)
        self.peak_rows = max(self.peak_rows, len(harm) + len(benign))
        return Chunk(harm, benign, idx, last or [])

    def batches(self, harmful: torch.Tensor, benign: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless SAE batches: ``mixed_batches`` of the given (first) chunk, then of each next chunk
        once the current one's benign part has been drawn once (its harmful part about once too,
        at the configured mix); the last chunk serves for ever."""
        i = 0
        while True:
            it = mixed_batches(harmful, benign, self.hf, batch_size, seed + i)
            if self.done:
                yield from it
                return
            n_h = round(self.hf * batch_size) if len(benign) else batch_size
            n_b = batch_size - n_h
            n = math.ceil(len(benign) / n_b) if n_b and len(benign) else math.ceil(len(harmful) / max(1, n_h))
            for _ in range(max(1, n)):
                yield next(it)
            harmful = benign = it = None   # free this chunk before the next one is collected
            c = self.next_chunk()
            harmful, benign = c.harmful, c.benign
            del c
            i += 1

    def info(self) -> dict:
        return {"chunk_tokens": self.chunk_tokens, "n_chunks": self.n_chunks, "peak_rows": self.peak_rows,
                "residuals_generated": dict(self.rows), "benign_tokens": self.benign_seen,
                "harmful_prompt_passes": round(self._harm_seen / len(self.harmful_ids), 3)}
