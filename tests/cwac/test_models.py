"""Model loading offline: a hub id loads from the local Hugging Face cache when its weights are
there, and otherwise fails at once naming the hub id, the key and both fixes. The model judges
check their weights with the same function (``cwac.models.locate_weights``)."""

from __future__ import annotations

import shutil

import pytest
import torch

from cwac.artifacts import ArtifactStore
from cwac.models import load_model, locate_weights, resolve_model_path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_cfg):
    """A local hub cache holding the tiny model as ``org/tiny`` (the layout ``hf download`` makes)."""
    import huggingface_hub.constants as constants

    cfg = tiny_cfg()
    folder = resolve_model_path(cfg.model, ArtifactStore(cfg.paths.artifacts))
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(folder, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return folder


def test_an_offline_hub_id_loads_from_the_local_cache(hub_cache):
    model, tok = load_model("org/tiny", hub_ok=False)
    ref, _ = load_model(hub_cache)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_an_offline_hub_id_not_in_the_cache_names_the_id_and_both_fixes(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"model 'org/missing' \(model.path\) is a hub id, and the run is "
                                                r"offline .*not in the local Hugging Face cache .*Fix: run with "
                                                r"offline=false to download it, or download it once .*"
                                                r"pass model.path=DIR"):
        load_model("org/missing", hub_ok=False)


def test_the_judges_check_their_weights_with_the_model_loaders_check(hub_cache, monkeypatch):
    import eval.model_judges as judges

    seen = []
    monkeypatch.setattr(judges, "locate_weights", lambda *a, **k: seen.append((a, k)) or a[0])
    judges.check_weights("org/tiny", "beaver_dam")
    assert seen and seen[0][0][2] == "judge.weights"
    assert locate_weights("org/tiny", "judge", "judge.weights", offline=True) == "org/tiny"
