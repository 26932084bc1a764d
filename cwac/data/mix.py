"""The fine-tuning mix: ``n·(1−p)`` benign task rows + ``n·p`` harmful pairs.

Follows the literature's protocol (Lisa / Vaccine; ``docs/baselines.md`` "Fine-tuning mixes"):
the *first* rows of each source in file order, concatenated, then shuffled with the seed.
"""

from __future__ import annotations

import logging
import random

from cwac.data.examples import Example
from cwac.data.files import DataError
from cwac.data.harmful import beavertails_pairs, drop_eval_prompts
from cwac.data.tasks import load_task

log = logging.getLogger(__name__)


def harmful_count(n_total: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"harmful ratio must be in [0, 1], got {ratio}")
    return int(round(n_total * ratio))


def build_finetune_mix(task: str, n_total: int, ratio: float, seed: int, *, harmful_source: str = "local",
                       task_source: str = "local", harmful_pool: list[Example] | None = None) -> list[Example]:
    """Deterministic (given ``seed``) poisoned fine-tuning set.

    Args:
        task: task name (``sst2``, ``agnews``, ``gsm8k``).
        n_total: total rows n (paper: 5000).
        ratio: harmful fraction p.
        harmful_pool: harmful pairs to draw from (default: BeaverTails from ``harmful_source``).
    """
    n_harm = harmful_count(n_total, ratio)
    pool = harmful_pool if harmful_pool is not None else (beavertails_pairs(harmful_source) if n_harm else [])
    pool, dropped = drop_eval_prompts(pool) if n_harm else (pool, 0)   # evaluation prompts never train
    if dropped:
        log.info("dropped %d harmful pairs whose prompt is in an evaluation set", dropped)
    if n_harm > len(pool):
        raise DataError(
            f"the mix asks for {n_harm} harmful rows (harmful.n_total={n_total} x harmful.ratio={ratio}) but "
            f"harmful.source={harmful_source!r} has only {len(pool)} (after removing {dropped} evaluation prompts); "
            f"lower harmful.n_total or the ratio (max n_total at p={ratio} is "
            f"{int(len(pool) / ratio) if ratio else 'unbounded'}), or use a larger source (harmful.source=hub offline=false)")
    rows = list(pool[:n_harm]) + load_task(task, "train", n_total - n_harm, source=task_source)
    random.Random(seed).shuffle(rows)
    return rows
