"""SafeInstr: Safety-Tuned LLaMAs (Bianchi et al., arXiv 2309.07875; ``vinid/safety-tuned-llamas``).

Appends N (harmful instruction -> refusal) rows to the user's fine-tuning data, then trains with
plain SFT (docs/baselines.md, "SafeInstr"). The rows come from ``baselines._data.safety_rows``:
held-in harmful prompts (disjoint from every HS evaluation set, asserted) with refusals from the
alignment stage's bank. The reference's refusals were written by a model; ours are composed.

N: ``count`` when set, else ``round(fraction * len(rows))``. Default fraction 0.1 is the top of
the paper's range (100-2000 pairs mixed into 20k Alpaca rows = 0.5-10%) and, at p = 0.1, as
many refusals as harmful rows; the count CWAC used is not reported. The rows are *added*
(the training set grows), as in the reference, and the mix is reshuffled with the seed.
"""

from __future__ import annotations

import random

from baselines._data import safety_rows
from cwac.data.examples import Example
from cwac.api import Method


class SafeInstr(Method):
    stages = ("finetune",)

    def n_safety(self, n_rows: int) -> int:
        if self.cfg.count is not None:
            n = int(self.cfg.count)
        else:
            f = float(self.cfg.fraction)
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"method.fraction must be in [0, 1], got {f}")
            n = int(round(f * n_rows))
        if n < 0:
            raise ValueError(f"method.count must be >= 0, got {n}")
        return n

    def build_train_data(self, rows: list[Example]) -> list[Example]:
        n = self.n_safety(len(rows))
        self.added = safety_rows(self.ctx, n, int(self.cfg.seed)) if n else []
        out = list(rows) + self.added
        random.Random(int(self.ctx.seed)).shuffle(out)
        return out

    def record_info(self) -> dict:
        return {"n_safety_rows": len(getattr(self, "added", [])), "fraction": self.cfg.fraction,
                "count": self.cfg.count, "prompt_pool": "held_in_harmful_prompts",
                "refusals": "cwac.alignment.refusal_text"}
