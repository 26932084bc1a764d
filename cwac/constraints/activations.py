"""Streaming a decoder's activations over prompts: batching, masks, hooks, early exit.

Everything CWAC builds offline (input covariances, SAE corpora, latent baselines) and its
per-step regulariser reads activations of a Hugging Face decoder that may be wrapped by peft
(``PeftModel``) or DeepSpeed (``engine.module``). The helpers here find the decoder layers
through those wrappers, left-pad prompts with explicit ``position_ids`` (so a prompt's
activations do not depend on what it is batched with), mark which positions count (padding
never; optionally the chat template's shared prefix and the first token) and stop the forward
pass right after the last layer that is needed (docs/method.md §4.5: "the regulariser forward pass
only needs layers 0..l*").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cwac.data.examples import Example
from cwac.data.prompts import collate_prompts
from cwac.modeling import decoder_layers, unwrap_engine


def resolve_layer(layer: int | None, relative_depth: float, n_layers: int) -> int:
    """A layer index from an explicit (possibly negative) index or a relative depth in [0, 1]."""
    if layer is None:
        if not 0.0 <= relative_depth <= 1.0:
            raise ValueError(f"relative_depth must be in [0, 1], got {relative_depth}")
        return min(n_layers - 1, int(relative_depth * n_layers))
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layers} decoder layers")
    return idx


def encode_prompts(formatter, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt in the model's prompt format (chat template + generation prompt).

    Over-long prompts keep their end, where the answer is decided (as ``train_features`` does).
    """
    out = []
    for p in prompts:
        ids = formatter.prompt_ids(Example(p))
        out.append(ids[-max_tokens:] if len(ids) > max_tokens else ids)
    return out


def encode_conversations(formatter, examples: Sequence[Example], max_tokens: int) -> list[list[int]]:
    """Prompt + answer ids (no labels) of instruction rows, truncated to ``max_tokens``."""
    out = []
    for e in examples:
        ids = formatter.prompt_ids(e) + formatter.tok(e.output, add_special_tokens=False)["input_ids"]
        out.append(ids[:max_tokens])
    return out


def shared_prefix_len(id_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to every list (the chat template's fixed start).

    Causal attention makes the activations of these positions identical across prompts, so
    they carry no prompt information; counting them once per prompt lets them dominate
    statistics (docs/organism.md: system-prompt tokens dominate some layers' covariance).
    """
    if not id_lists:
        return 0
    first = id_lists[0]
    n = min(len(x) for x in id_lists)
    for j in range(n):
        t = first[j]
        if any(x[j] != t for x in id_lists):
            return j
    return max(0, n - 1)  # never mask a whole prompt


@dataclass
class PromptBatch:
    """A left-padded batch. ``token_mask`` marks the positions that count for statistics."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_mask: torch.Tensor  # bool [B, T]

    def to(self, device) -> "PromptBatch":
        return PromptBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.token_mask)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def make_batch(id_lists: Sequence[Sequence[int]], pad: int, skip_tokens: int = 0) -> PromptBatch:
    """Left-pad ``id_lists``; positions ``< skip_tokens`` of each sequence are left out of ``token_mask``.

    ``position_ids`` count real tokens only, so the activations of a prompt are the same (up to
    float rounding) whatever it is padded to.
    """
    enc = collate_prompts([list(x) for x in id_lists], pad)
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    token_mask = mask.bool() & (pos >= skip_tokens)
    return PromptBatch(enc["input_ids"], mask, pos, token_mask)


@dataclass
class PackedPromptBatch:
    """Prompts packed into one row ``[1, T]`` that holds their shared first tokens once.

    The first ``prefix`` tokens (the chat template's fixed start, identical in every prompt) come
    once, then each prompt's remaining tokens. ``attention_mask`` is a 4D additive mask: a token
    sees the shared prefix and the earlier tokens of its own prompt, never another prompt's, and
    ``position_ids`` continue from the prefix in every prompt. Every prompt's activations are
    therefore those of the prompt alone (up to float rounding), and the prefix's gradient is the
    sum over the prompts, as in a padded batch; the prefix is computed once instead of B times and
    nothing is padded.
    """

    input_ids: torch.Tensor       # [1, T]
    position_ids: torch.Tensor    # [1, T]
    attention_mask: torch.Tensor  # [1, 1, T, T], 0 where attention is allowed, dtype-min elsewhere
    seq_idx: torch.Tensor         # [T]: the prompt each position belongs to, -1 for the shared prefix
    token_mask: torch.Tensor      # [T] bool: positions that count for mean pooling (position >= skip)
    last: torch.Tensor            # [B]: each prompt's last position

    def to(self, device) -> "PackedPromptBatch":
        return PackedPromptBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask,
                                                         self.seq_idx, self.token_mask, self.last)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    @property
    def n_prompts(self) -> int:
        return int(self.last.numel())


def make_packed_batch(id_lists: Sequence[Sequence[int]], prefix: int, skip_tokens: int = 0,
                      dtype: torch.dtype = torch.float32) -> PackedPromptBatch:
    """Pack ``id_lists`` sharing their first ``prefix`` tokens (see ``PackedPromptBatch``).

    ``prefix`` is cut to what every list really shares and leaves at least one own token per list.
    """
    lists = [list(x) for x in id_lists]
    p = max(0, min([prefix] + [len(x) - 1 for x in lists]))
    while p and any(x[:p] != lists[0][:p] for x in lists):
        p -= 1
    ids, pos, seq = list(lists[0][:p]), list(range(p)), [-1] * p
    last = []
    for i, x in enumerate(lists):
        own = x[p:]
        ids += own
        pos += range(p, p + len(own))
        seq += [i] * len(own)
        last.append(len(ids) - 1)
    seq_t, pos_t = torch.tensor(seq), torch.tensor(pos)
    t = torch.arange(len(ids))
    causal = t.unsqueeze(1) >= t.unsqueeze(0)                                    # [q, k]
    same = (seq_t.unsqueeze(1) == seq_t.unsqueeze(0)) | (seq_t.unsqueeze(0) == -1)
    allowed = causal & same
    mask = torch.zeros(len(ids), len(ids), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return PackedPromptBatch(torch.tensor([ids]), pos_t.unsqueeze(0), mask[None, None], seq_t,
                             pos_t >= skip_tokens, torch.tensor(last))


def iter_batches(id_lists: Sequence[Sequence[int]], batch_size: int, pad: int,
                 skip_tokens: int = 0) -> Iterator[tuple[list[int], PromptBatch]]:
    """Deterministic batches, longest first (little padding); yields (indices, batch)."""
    order = sorted(range(len(id_lists)), key=lambda i: (-len(id_lists[i]), i))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        yield idx, make_batch([id_lists[i] for i in idx], pad, skip_tokens)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the layers above are not needed)."""


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def residual_capture(model: nn.Module, layer: int, early_exit: bool = True):
    """Capture the residual stream after decoder block ``layer`` (``hidden_states[layer + 1]``).

    Yields a dict that receives ``"resid"`` during the forward; with ``early_exit`` the hook
    raises ``StopForward`` right after the block, so layers above ``layer`` never run.
    Use with ``forward_quietly``.
    """
    store: dict[str, torch.Tensor] = {}
    block = decoder_layers(model)[layer]

    def hook(_mod, _inp, out):
        store["resid"] = _hidden(out)
        if early_exit:
            raise StopForward

    h = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        h.remove()


@contextmanager
def stop_after(model: nn.Module, layer: int):
    """End every forward pass inside the block right after decoder block ``layer``."""
    def hook(_mod, _inp, _out):
        raise StopForward

    h = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def forward_quietly(model: nn.Module, batch: PromptBatch) -> None:
    """Run the (unwrapped-from-DeepSpeed) model on ``batch``; a ``StopForward`` ends it normally."""
    m = unwrap_engine(model)
    try:
        m(**batch.model_inputs(), use_cache=False)
    except StopForward:
        pass
