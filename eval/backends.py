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

    def close(self) -> None:
        """Release what the backend holds (a worker process, saved weights); no-op by default."""

    def describe(self) -> dict:
        return {"name": self.name, "reason": getattr(self, "choice_reason", None)}


BACKENDS: Registry[GenerationBackend] = Registry("generation backend", GenerationBackend)


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


@BACKENDS.register("hf")
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

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int, desc: str = "generate") -> list[str]:
        ids = [self.fmt.prompt_ids(e) for e in examples]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[str] = [""] * len(ids)
        pad = pad_id(self.tok)
        stop = stop_token_ids(self.tok, getattr(self.model, "generation_config", None))
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for b in tqdm(batches, desc=desc, disable=not self.progress, dynamic_ncols=True):
            enc = collate_prompts([ids[i] for i in b], pad)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=stop,
                                      temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(b):
                out[i] = self.tok.decode(new[j], skip_special_tokens=True).strip()
            self.generated_tokens += count_generated(new.tolist(), stop)
        if was_training:
            self.model.train()
        return out


def build_backend(ecfg, model, tokenizer, formatter: PromptFormatter, run_dir=None, dtype: str = "float32",
                  seed: int = 0) -> GenerationBackend:
    """The backend named by ``eval.backend``: ``hf``, ``vllm`` or ``auto`` (vLLM when it is
    installed and supports the model, else HF; ``describe()["reason"]`` says why). A vLLM
    backend gets the model saved under ``<run_dir>/model`` (deleted on ``close()`` unless
    ``eval.keep_model``)."""
    from eval.vllm_backend import VLLMBackend, choose_backend

    from omegaconf import DictConfig, OmegaConf

    vcfg = ecfg.get("vllm") or {}
    vcfg = OmegaConf.to_container(vcfg, resolve=True) if isinstance(vcfg, DictConfig) else dict(vcfg)
    name, reason = choose_backend(ecfg.backend, model, vcfg)
    if name == "hf":
        backend: GenerationBackend = HFBackend(model, tokenizer, formatter, batch_size=ecfg.batch_size,
                                               progress=ecfg.progress)
        backend.choice_reason = reason
        return backend
    if run_dir is None:
        raise ValueError("the vLLM backend needs a run_dir to save the model into")
    from pathlib import Path

    backend = VLLMBackend.from_model(model, tokenizer, formatter, Path(run_dir) / "model", dtype=dtype,
                                     keep_model=bool(ecfg.get("keep_model", False)), seed=seed,
                                     log_path=str(Path(run_dir) / "vllm_worker.log"), **vcfg)
    backend.choice_reason = reason
    return backend
