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
from cwac.schema import ConfigError


class SafeInstr(Method):
    step_state = ()   # it only adds rows before training (cwac.resume)
    stages = ("finetune",)

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """``count`` (when set) is an integer >= 0, else ``fraction`` is in [0, 1]."""
        if node.count is not None:
            if isinstance(node.count, bool) or not isinstance(node.count, int) or node.count < 0:
                raise ConfigError(f"config {key}.count={node.count!r} is not valid: it must be an integer >= 0, "
                                  f"or null to use {key}.fraction")
        elif isinstance(node.fraction, bool) or not isinstance(node.fraction, (int, float)) \
                or not 0.0 <= node.fraction <= 1.0:
            raise ConfigError(f"config {key}.fraction={node.fraction!r} is not valid: it must be a number in [0, 1] "
                              f"(default 0.1), or set {key}.count=<rows>")

    def n_safety(self, n_rows: int) -> int:
        if self.cfg.count is not None:
            return int(self.cfg.count)
        return int(round(float(self.cfg.fraction) * n_rows))

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
