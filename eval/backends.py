"""Generation backends behind one interface.

``hf``: batched Hugging Face ``generate`` (``cwac.generation``: left padding, greedy, the model's
prompt format through ``PromptFormatter``); ``vllm`` (``eval.vllm_backend``). Both receive the
same ``Example`` rows, so HS/FA are computed identically whatever generated. ``eval.factory``
picks one from ``eval.backend``.
"""

from __future__ import annotations

from cwac.data.examples import Example
from cwac.data.prompts import PromptFormatter
from cwac.generation import greedy_generate


class GenerationBackend:
    """Greedy completion of prompts. ``generate`` returns the new text only, stripped."""

    name = "base"

    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (a worker process, saved weights); no-op by default."""

    def describe(self) -> dict:
        return {"name": self.name, "reason": getattr(self, "choice_reason", None)}


class HFBackend(GenerationBackend):
    """Batched greedy generation with a loaded (possibly peft-wrapped) HF model.

    Prompts are sorted by length so that each batch pads little; outputs are returned in
    the input order. Generation stops at EOS and at the model's other end-of-turn ids
    (``stop_token_ids``).
    """

    name = "hf"

    def __init__(self, model, tokenizer, formatter: PromptFormatter, batch_size: int = 16, progress: bool = True):
        self.model = model
        self.tok = tokenizer
        self.fmt = formatter
        self.batch_size = batch_size
        self.progress = progress
        self.generated_tokens = 0  # new tokens up to and including EOS (throughput accounting)

    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        out, n = greedy_generate(self.model, self.tok, self.fmt, examples, max_new_tokens,
                                 batch_size=self.batch_size, progress=self.progress, desc=desc)
        self.generated_tokens += n
        return out
