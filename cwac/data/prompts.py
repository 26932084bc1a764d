"""Prompt formatting and tokenisation, identical for training and evaluation.

Two formats (docs/method.md §6.2 leaves it open, so it is a config field ``model.prompt_format``):
``chat`` uses the tokenizer's own chat template with the user message
``instruction`` (+ ``"\n\n" + input``); ``alpaca`` uses the Stanford Alpaca template of the
harmful-fine-tuning literature. The prompt/response boundary is found by tokenising the
prompt alone (docs/baselines.md, SFT pitfalls), and EOS is appended to the target.
"""

from __future__ import annotations

import torch

from cwac.data.examples import Example

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


class PromptFormatter:
    """Turns ``Example`` rows into token ids with the model's prompt format.

    Args:
        tokenizer: a Hugging Face tokenizer.
        style: ``chat`` or ``alpaca``.
        system_prompt: optional system message for ``chat`` (None keeps the template's default).
        alpaca_trailing_newline: append ``\n`` after ``### Response:`` (Booster line) or not (Vaccine/Lisa).
    """

    def __init__(self, tokenizer, style: str = "chat", system_prompt: str | None = None,
                 alpaca_trailing_newline: bool = True):
        if style not in ("chat", "alpaca"):
            raise ValueError(f"prompt_format must be 'chat' or 'alpaca', got {style!r}")
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format=chat but the tokenizer has no chat template; use model.prompt_format=alpaca")
        self.tok = tokenizer
        self.style = style
        self.system_prompt = system_prompt
        self.newline = alpaca_trailing_newline

    @staticmethod
    def user_message(ex: Example) -> str:
        return f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction

    def prompt_text(self, ex: Example) -> str:
        if self.style == "alpaca":
            t = (ALPACA_WITH_INPUT if ex.input else ALPACA_NO_INPUT).format(instruction=ex.instruction, input=ex.input)
            return t + ("\n" if self.newline else "")
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": self.user_message(ex)})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, ex: Example) -> list[int]:
        # A chat template writes BOS itself when the model uses one; Alpaca text relies on the tokenizer.
        return self.tok(self.prompt_text(ex), add_special_tokens=self.style == "alpaca")["input_ids"]

    def train_features(self, ex: Example, max_len: int) -> dict[str, list[int]]:
        """input_ids and labels (prompt positions = -100); truncates the response first."""
        p = self.prompt_ids(ex)
        r = self.tok(ex.output, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        if len(p) >= max_len:  # keep the end of an over-long prompt and at least one target token
            p = p[-(max_len - 1):]
        r = r[: max_len - len(p)]
        return {"input_ids": p + r, "labels": [-100] * len(p) + r}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_train(features: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask; padded labels are -100."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(features: list[dict], pad: int | None = None) -> dict[str, torch.Tensor]:
    """A padding-free training batch: the rows concatenated into one sequence of shape [1, T].

    Built by transformers' ``DataCollatorWithFlattening``: ``position_ids`` restart at 0 for every
    row (which keeps attention block-causal per row, ``cwac.losses.model_inputs``), ``labels``
    carry -100 at each row's first token (so no row predicts the next one's start), and
    ``seq_idx`` says which row each position came from (the per-example loss mean). ``pad`` is
    unused (nothing is padded); it keeps the signature of ``collate_train``.
    """
    from transformers import DataCollatorWithFlattening

    out = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_seq_idx=True)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], return_tensors="pt")
    return {k: out[k].long() for k in ("input_ids", "labels", "position_ids", "seq_idx")}


def collate(features: list[dict], pad: int, packed: bool) -> dict[str, torch.Tensor]:
    """A training batch of ``features``: packed (``collate_packed``) or right-padded (``collate_train``)."""
    return collate_packed(features) if packed else collate_train(features, pad)


def is_packed(batch: dict) -> bool:
    return "seq_idx" in batch


def batch_rows(batch: dict) -> int:
    """How many examples a training batch holds, padded or packed."""
    return int(batch["seq_idx"].max()) + 1 if is_packed(batch) else int(batch["input_ids"].shape[0])


def collate_prompts(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (for generation and last-token activations)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
