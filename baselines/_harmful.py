"""Harmful (prompt, harmful answer) pairs for the alignment-stage defences (Booster, T-Vaccine,
RepNoise), and the seeded batches they draw from them.

The pairs come from the same BeaverTails pool as the fine-tuning attack (``beavertails_pairs``),
from a range the attack does not start from, as the references keep their defence pairs apart
from the attack's (docs/baselines.md, "Disjoint index ranges": attack 0-999, defence 5000-9999):

* ``local``: rows 100-199 of the 200 local pairs. The CPU mixes (n = 400) fine-tune on the first
  n*p rows, so these rows are disjoint from the attack up to p = 0.25; at p = 0.5 the attack uses
  all 200 local pairs and overlaps them (only 200 pairs ship offline).
* ``hub``: rows 5000-9999 of the unsafe ``30k_train`` rows (the references' ``poison_data_start``).

Rows whose prompt is in an evaluation set or a validation set (``beavertails_attack_val``, the
attack rows' front prompts; ``harmbench_val``) are dropped, so 99 local pairs remain.
"""

from __future__ import annotations

import random

import torch

from cwac.data.examples import Example
from cwac.data.harmful import EVAL_HARMFUL_SETS, VALIDATION_HARMFUL_SETS, beavertails_pairs, drop_eval_prompts
from cwac.data.prompts import collate, pad_id

#: where each source's defence range starts (the attack reads from row 0)
_START = {"local": 100, "hub": 5000}
_STOP = {"local": 200, "hub": 10000}


def harmful_pairs(source: str, n: int | None) -> list[Example]:
    """The first ``n`` (all when None) defence pairs of ``source`` (``local`` or ``hub``)."""
    if source not in _START:
        raise ValueError(f"method.harmful_source must be 'local' or 'hub', got {source!r}")
    rows = beavertails_pairs(source)[_START[source]:_STOP[source]]
    rows, _ = drop_eval_prompts(rows, EVAL_HARMFUL_SETS + VALIDATION_HARMFUL_SETS)
    if n is not None:
        if n < 1 or n > len(rows):
            raise ValueError(f"method.n_harmful={n} but harmful_source={source!r} has {len(rows)} defence pairs "
                             f"(after removing evaluation and validation prompts); set method.n_harmful=null (all) "
                             f"or a smaller count, or harmful_source=hub offline=false")
        rows = rows[:n]
    return rows


class HarmfulBatches:
    """Cyclic seeded batches of tokenised harmful pairs: a fresh permutation per pass over the
    pool; under several ranks each rank takes its own slice of every global draw."""

    def __init__(self, rows: list[Example], formatter, tokenizer, max_len: int, seed: int):
        if not rows:
            raise ValueError("the harmful pool is empty")
        self.features = [formatter.train_features(e, max_len) for e in rows]
        self.pad = pad_id(tokenizer)
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.last_ids: list[int] = []   # the rows of the latest batch (inspection, tests)

    def _take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.features)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop(0))
        return out

    def _draw(self, size: int) -> list[int]:
        rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                       if torch.distributed.is_initialized() else (0, 1))
        ids = self._take(size * world)[rank * size: (rank + 1) * size]
        self.last_ids = ids
        return ids

    def _collate(self, ids: list[int], packed: bool, device) -> dict:
        batch = collate([self.features[i] for i in ids], self.pad, packed=packed)
        return {k: v.to(device) if device is not None else v for k, v in batch.items()}

    def next(self, size: int, packed: bool = False, device=None) -> dict:
        return self._collate(self._draw(size), packed, device)

    def next_chunks(self, size: int, chunk: int, reduction: str, packed: bool = False,
                    device=None) -> list[tuple[dict, float]]:
        """The next batch of ``size`` rows (the rows ``next`` would draw) as forward passes of at most
        ``chunk`` rows, each with its weight: the weighted sum of the chunks' losses is the whole
        batch's loss under ``reduction`` (``sequence``: a chunk's share of the rows; ``token``: its
        share of the target tokens), and so is the weighted sum of their gradients. A pass then holds
        the activations of ``chunk`` rows, not of ``size``."""
        ids = self._draw(size)
        parts = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
        if reduction not in ("sequence", "token"):
            raise ValueError(f"loss reduction must be 'sequence' or 'token', got {reduction!r}")
        targets = {i: sum(1 for t in self.features[i]["labels"][1:] if t != -100) for i in ids}
        # cwac.losses.target_ce: the sequence mean runs over the rows that have a target token
        n = [sum(targets[i] if reduction == "token" else int(targets[i] > 0) for i in part) for part in parts]
        total = sum(n) or 1
        return [(self._collate(part, packed, device), k / total) for part, k in zip(parts, n)]
