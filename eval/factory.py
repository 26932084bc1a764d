"""The generation backend a cell evaluates with, chosen by ``eval.backend``.

Kept apart from both backends so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cwac.data.prompts import PromptFormatter
from eval.backends import GenerationBackend, HFBackend
from eval.vllm_backend import VLLMBackend, choose_backend


def build_backend(ecfg, model, tokenizer, formatter: PromptFormatter, run_dir=None, dtype: str = "float32",
                  seed: int = 0) -> GenerationBackend:
    """The backend named by ``eval.backend``: ``hf``, ``vllm`` or ``auto`` (vLLM when it is
    installed and supports the model, else HF; ``describe()["reason"]`` says why). A vLLM
    backend gets the model saved under ``<run_dir>/model`` (deleted on ``close()`` unless
    ``eval.keep_model``)."""
    vcfg = ecfg.vllm or {}
    vcfg = OmegaConf.to_container(vcfg, resolve=True) if isinstance(vcfg, DictConfig) else dict(vcfg)
    name, reason = choose_backend(ecfg.backend, model, vcfg)
    if name == "hf":
        backend: GenerationBackend = HFBackend(model, tokenizer, formatter, batch_size=ecfg.batch_size,
                                               progress=ecfg.progress)
        backend.choice_reason = reason
        return backend
    if run_dir is None:
        raise ValueError("the vLLM backend needs a run_dir to save the model into")
    backend = VLLMBackend.from_model(model, tokenizer, formatter, Path(run_dir) / "model", dtype=dtype,
                                     keep_model=bool(ecfg.keep_model), seed=seed,
                                     log_path=str(Path(run_dir) / "vllm_worker.log"), **vcfg)
    backend.choice_reason = reason
    return backend
