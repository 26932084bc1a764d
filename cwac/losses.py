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


def target_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sequence") -> torch.Tensor:
    """``sequence_mean_ce`` on logits already aligned with their targets (-100 = no target)."""
    logits = logits.float()
    mask = targets != -100
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets) * mask
    if reduction == "token":
        return tok_loss.sum() / mask.sum().clamp_min(1)
    if reduction == "sequence":
        per_seq = tok_loss.sum(1) / mask.sum(1).clamp_min(1)
        has = (mask.sum(1) > 0).float()
        return (per_seq * has).sum() / has.sum().clamp_min(1)
    raise ValueError(f"training.loss_reduction must be 'sequence' or 'token', got {reduction!r}")


def response_loss(model, batch: dict, reduction: str = "sequence") -> torch.Tensor:
    """``sequence_mean_ce`` of ``model`` on ``batch``, with the LM head applied only where it is used.

    Position t's logits predict token t+1, so only positions whose next token is a response token
    in some row of the batch are kept (``logits_to_keep``, a position index shared by the rows;
    other rows' targets there are -100). The loss is the same; the (vocabulary x hidden) head and
    its backward skip the prompt positions, which on short-answer tasks are nearly all of them.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return target_ce(out.logits, labels[:, keep + 1], reduction)
