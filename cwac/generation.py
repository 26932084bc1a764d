"""Batched greedy generation with a Hugging Face model, in the model's prompt format.

The evaluation's HF backend (``eval.backends.HFBackend``) and CWAC's refusal filter
(``cwac.constraints.pool``) both generate through ``greedy_generate``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from cwac.data.examples import Example
from cwac.data.prompts import PromptFormatter, collate_prompts, pad_id


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS (what fine-tuning appends to targets),
    then any other end ids of the model's generation config (a ``GenerationConfig`` or its
    dict), e.g. Gemma-2's ``<end_of_turn>`` or Llama-3's ``<|eot_id|>``, at which the aligned
    chat model ends its turns."""
    ids = [int(tokenizer.eos_token_id)]
    extra = (generation_config.get("eos_token_id") if isinstance(generation_config, dict)
             else getattr(generation_config, "eos_token_id", None))
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def count_generated(rows: list[list[int]], stop: list[int]) -> int:
    """Generated tokens per row up to and including the first stop token (padding after it excluded)."""
    stops = set(stop)
    return sum(next((j + 1 for j, t in enumerate(r) if t in stops), len(r)) for r in rows)


@torch.no_grad()
def greedy_generate(model, tokenizer, formatter: PromptFormatter, examples: list[Example], max_new_tokens: int, *,
                    batch_size: int = 16, progress: bool = True, desc: str = "generate") -> tuple[list[str], int]:
    """(answers in input order, generated tokens up to and including the stop token).

    Prompts are sorted by length so that each batch pads little. Generation stops at EOS and at
    the model's other end-of-turn ids (``stop_token_ids``). Answers are the new text only, stripped.
    """
    ids = [formatter.prompt_ids(e) for e in examples]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    pad = pad_id(tokenizer)
    stop = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_generated = 0
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for b in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True):
        enc = collate_prompts([ids[i] for i in b], pad)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=stop, temperature=None, top_p=None, top_k=None)
        new = gen[:, enc["input_ids"].shape[1]:]
        for j, i in enumerate(b):
            out[i] = tokenizer.decode(new[j], skip_special_tokens=True).strip()
        n_generated += count_generated(new.tolist(), stop)
    if was_training:
        model.train()
    return out, n_generated
