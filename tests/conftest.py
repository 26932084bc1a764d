"""Shared fixtures: offline environment, composing the real ``conf/`` tree, a tiny model.

Every test composes the project's own configs (Hydra Compose API) and shrinks them with
``budget=smoke`` and ``model=tiny``; nothing reaches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cwac.utils import CONF_DIR as _CONF, OFFLINE_ENV, compose_config

for _k, _v in {**OFFLINE_ENV, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}.items():
    os.environ[_k] = _v
os.environ.setdefault("OMP_NUM_THREADS", "2")

CONF_DIR = str(_CONF)


def compose(*overrides: str, runs: Path | None = None, artifacts: Path | None = None):
    """The project's config with ``overrides`` (Hydra Compose API)."""
    extra = []
    if runs is not None:   # never reuse the repository's committed records (results/records)
        extra.append(f"paths.runs={runs}")
        if not any(o.startswith("paths.records=") for o in overrides):
            extra.append(f"paths.records={Path(runs) / '_committed'}")
    if artifacts is not None:
        extra.append(f"paths.artifacts={artifacts}")
    return compose_config(*overrides, *extra)


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    """Artifacts shared by the whole session (the tiny model is built once)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture
def tiny_cfg(tmp_path, artifacts_dir):
    """Factory: ``tiny_cfg("method=sft", ...)`` -> a smoke-sized config on the tiny Llama."""

    def make(*overrides: str):
        own = any(o.startswith("paths.artifacts=") for o in overrides)
        return compose("model=tiny", "budget=smoke", "logger=none", *overrides, runs=tmp_path / "runs",
                       artifacts=None if own else artifacts_dir)

    return make


@pytest.fixture
def tiny_model(tiny_cfg):
    """(model, tokenizer, formatter, cfg) for the tiny Llama."""
    from cwac.artifacts import ArtifactStore
    from cwac.models import load_chat_model, resolve_model_path

    cfg = tiny_cfg()
    path = resolve_model_path(cfg.model, ArtifactStore(cfg.paths.artifacts))
    model, tok, fmt = load_chat_model(path, cfg.model)
    return model, tok, fmt, cfg


@pytest.fixture(autouse=True)
def _seed():
    from cwac.utils import seed_everything

    seed_everything(0)
