"""The one row type every data builder returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Example:
    """An instruction-following example in Alpaca fields.

    Attributes:
        instruction: the request (task instruction or harmful prompt).
        input: optional context (e.g. the SST-2 sentence); "" when absent.
        output: the target response (may be "" for prompt-only evaluation rows).
        source: where the row comes from (``sst2``, ``beavertails``, ``refusal``, ...).
        label: gold label for scoring (``positive``, ``World``, ``42``), else None.
    """

    instruction: str
    input: str = ""
    output: str = ""
    source: str = ""
    label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
