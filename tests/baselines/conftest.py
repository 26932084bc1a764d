"""Fixtures for the baseline tests: a controlled (base, aligned) checkpoint pair on the tiny Llama,
contexts for methods, and tokenised rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cwac.artifacts import ArtifactStore
from cwac.api import TrainContext
from cwac.experiment.plugins import get_method

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"


@pytest.fixture
def weight_pair(tiny_model, tmp_path):
    """(base_dir, aligned_dir, u, V_v): the aligned model differs from the base only in layer 0:
    q_proj by a rank-1 V = u x^T with ||V||_F = 1 (so the reference C = u u^T is a projector), and
    v_proj by a random rank-3 V_v. Every other matrix has V = 0 (C = 0)."""
    model, tok, _, _ = tiny_model
    base, aligned = tmp_path / "base", tmp_path / "aligned"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    q = model.get_submodule(Q0)
    u = torch.randn(q.weight.shape[0], generator=g)
    u /= u.norm()
    x = torch.randn(q.weight.shape[1], generator=g)
    x /= x.norm()
    v = model.get_submodule(V0)
    Vv = 0.05 * torch.randn(v.weight.shape[0], 3, generator=g) @ torch.randn(3, v.weight.shape[1], generator=g)
    with torch.no_grad():
        q.weight += torch.outer(u, x)
        v.weight += Vv
    model.save_pretrained(aligned)
    tok.save_pretrained(aligned)
    return base, aligned, u, Vv


def make_ctx(cfg, tok, fmt, store_root: Path, start: str = "", base: str | None = None, stage: str = "finetune",
             run_dir: Path | None = None) -> TrainContext:
    return TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=ArtifactStore(store_root), run_dir=run_dir,
                        stage=stage, start_model_path=str(start), base_model_path=None if base is None else str(base))


def make_method(name: str, ctx: TrainContext, **overrides):
    """A method from its real YAML (conf/method/<name>.yaml) with ``overrides``."""
    from tests.conftest import compose

    node = compose(f"method={name}").method
    OmegaConf.set_struct(node, False)
    node = OmegaConf.merge(node, overrides)
    return get_method(name)(node, ctx)


def prepared_on_weight_pair(name: str, tiny_model, weight_pair, tmp_path, *overrides, **method_cfg):
    """(method, model, u, V): method ``name`` prepared on the aligned tiny weights of ``weight_pair``
    (LoRA-wrapped when the overrides enable it), with the base weights as its reference."""
    from cwac.models import load_model
    from cwac.experiment.cell import apply_lora
    from tests.conftest import compose

    base, aligned, u, Vv = weight_pair
    _, tok, fmt, _ = tiny_model
    cfg = compose("model=tiny", "budget=smoke", *overrides)
    model, _ = load_model(str(aligned))
    if cfg.training.lora.enabled:
        model = apply_lora(model, cfg.training.lora)
    m = make_method(name, make_ctx(cfg, tok, fmt, tmp_path / "art", start=aligned, base=base), **method_cfg)
    m.prepare(model)
    return m, model, u, Vv


def features(fmt, n: int = 8, max_len: int = 48, ratio: float = 0.25):
    from cwac.data.mix import build_finetune_mix

    return [fmt.train_features(e, max_len) for e in build_finetune_mix("sst2", n, ratio, seed=0)]


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def padded_batch(tiny_model, n: int = 4):
    """A padded training batch of ``n`` mix rows for the tiny model."""
    from cwac.data.prompts import collate_train, pad_id

    _, tok, fmt, _ = tiny_model
    return collate_train(features(fmt, n), pad_id(tok))
