"""Generation backends behind one interface.

``hf``: batched Hugging Face ``generate`` (left padding, greedy, the model's prompt format
through ``PromptFormatter``). Other backends (vLLM) register under their own names and
receive the same ``Example`` rows, so HS/FA are computed identically whatever generated.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from cwac.data.examples import Example
from cwac.data.prompts import PromptFormatter, collate_prompts, pad_id
from cwac.registry import Registry


class GenerationBackend:
    """Greedy completion of prompts. ``generate`` returns the new text only, stripped."""

    name = "base"

    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        raise NotImplementedError


BACKENDS: Registry[GenerationBackend] = Registry("generation backend", GenerationBackend)


@BACKENDS.register("hf")
class HFBackend(GenerationBackend):
    """Batched greedy generation with a loaded (possibly peft-wrapped) HF model.

    Prompts are sorted by length so that each batch pads little; outputs are returned in
    the input order. Generation stops at EOS (and at the chat end-of-turn token, which is
    EOS for the models we use).
    """

    name = "hf"

    def __init__(self, model, tokenizer, formatter: PromptFormatter, batch_size: int = 16, progress: bool = True):
        self.model = model
        self.tok = tokenizer
        self.fmt = formatter
        self.batch_size = batch_size
        self.progress = progress

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        ids = [self.fmt.prompt_ids(e) for e in examples]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[str] = [""] * len(ids)
        pad = pad_id(self.tok)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for b in tqdm(batches, desc=desc, disable=not self.progress, dynamic_ncols=True):
            enc = collate_prompts([ids[i] for i in b], pad)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=self.tok.eos_token_id,
                                      temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(b):
                out[i] = self.tok.decode(new[j], skip_special_tokens=True).strip()
        if was_training:
            self.model.train()
        return out
