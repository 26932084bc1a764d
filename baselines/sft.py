"""SFT: plain supervised fine-tuning on the (possibly poisoned) mix, no defence.

Cross-entropy on response tokens only (prompt labels = -100), EOS appended to the target
(docs/baselines.md, "SFT"). All behaviour is the ``Method`` base class's.
"""

from cwac.api import Method


class SFT(Method):
    """The undefended reference."""

    step_state = ()   # nothing carries between steps (cwac.resume)
