"""The fine-tuning loss: causal-LM cross-entropy on response tokens, with the LM head applied
only where a response token is predicted."""

from __future__ import annotations

import torch


def sequence_mean_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sequence") -> torch.Tensor:
    """Causal-LM cross-entropy on response tokens (labels != -100), from full-sequence logits.

    ``sequence``: mean over examples of each example's mean token loss. With batch size 1
    (the paper's setting) this is the usual loss, and it makes gradient accumulation exactly
    equivalent to a larger batch of the same number of examples. ``token``: HF's mean over all
    response tokens of the batch.
    """
    return target_ce(logits[:, :-1], labels[:, 1:], reduction)


def target_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sequence",
              seq: torch.Tensor | None = None) -> torch.Tensor:
    """``sequence_mean_ce`` on logits already aligned with their targets (-100 = no target).

    ``seq``: for a packed batch (one row holding several examples), the example each target
    position belongs to; the ``sequence`` mean is then over examples, as in the padded batch.
    """
    logits = logits.float()
    mask = targets != -100
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets) * mask
    if reduction == "token":
        return tok_loss.sum() / mask.sum().clamp_min(1)
    if reduction == "sequence":
        if seq is None:
            sums, counts = tok_loss.sum(1), mask.sum(1)
        else:   # per example of the packed row(s)
            ids = seq.reshape(-1).long()
            n = int(ids.max()) + 1 if ids.numel() else 1
            sums = tok_loss.new_zeros(n).index_add(0, ids, tok_loss.reshape(-1))
            counts = mask.new_zeros(n, dtype=torch.long).index_add(0, ids, mask.reshape(-1).long())
        per_seq = sums / counts.clamp_min(1)
        has = (counts > 0).float()
        return (per_seq * has).sum() / has.sum().clamp_min(1)
    raise ValueError(f"training.loss_reduction must be 'sequence' or 'token', got {reduction!r}")


def model_inputs(batch: dict) -> dict:
    """The forward's keyword arguments for a training batch, padded or packed.

    A packed batch has no attention mask: its ``position_ids`` restart at 0 for every example,
    from which transformers' masking (``masking_utils.find_packed_sequence_indices``) builds a
    block-causal mask, so no example attends to another. That detection is skipped when a KV
    cache exists, hence ``use_cache=False``.
    """
    if "position_ids" in batch and "attention_mask" not in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def response_loss(model, batch: dict, reduction: str = "sequence") -> torch.Tensor:
    """``sequence_mean_ce`` of ``model`` on ``batch``, with the LM head applied only where it is used.

    Position t's logits predict token t+1, so only positions whose next token is a response token
    in some row of the batch are kept (``logits_to_keep``, a position index shared by the rows;
    other rows' targets there are -100). The loss is the same; the (vocabulary x hidden) head and
    its backward skip the prompt positions, which on short-answer tasks are nearly all of them.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    out = model(**model_inputs(batch), logits_to_keep=keep)
    seq = batch["seq_idx"][:, keep + 1] if "seq_idx" in batch else None
    return target_ce(out.logits, labels[:, keep + 1], reduction, seq)
