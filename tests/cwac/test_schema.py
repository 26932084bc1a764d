"""The typed schemas catch a misspelt key, a missing key or a wrong type, naming its path, on every
preset; ``run_cell`` checks them before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cwac.experiment.cell import run_cell
from cwac.experiment.preflight import check_settings as check_config
from cwac.schema import CWACConfig, TrainingConfig, check_node
from tests.conftest import CONF_DIR, compose

ALIGNMENT_STAGE = ("vaccine", "booster", "tvaccine", "repnoise")   # fine-tuning after them needs their own alignment
PRESETS = [[f"budget={b.stem}"] for b in (Path(CONF_DIR) / "budget").glob("*.yaml")] + \
          [[f"method={m.stem}"] + ([f"method@alignment.method={m.stem}"] if m.stem in ALIGNMENT_STAGE else [])
           for m in (Path(CONF_DIR) / "method").glob("*.yaml")] + \
          [["training=lora", "method=cwac"], ["model=tiny", "budget=smoke", "method=cwac_act_only"]]


@pytest.mark.parametrize("overrides", PRESETS, ids=lambda o: ",".join(o))
def test_every_preset_fits_the_schemas(overrides):
    check_config(compose(*overrides))


def _edited(*overrides: str, **edits):
    cfg = compose(*overrides)
    OmegaConf.set_struct(cfg, False)
    for dotted, value in edits.items():
        OmegaConf.update(cfg, dotted.replace("__", "."), value, force_add=True)
    return cfg


def test_a_misspelt_cwac_key_is_named():
    with pytest.raises(ValueError, match=r"method\.weight\.modee"):
        check_config(_edited("method=cwac", method__weight__modee="update"))


def test_a_misspelt_training_key_and_a_wrong_type_are_named():
    with pytest.raises(ValueError, match=r"training\.lrr"):
        check_config(_edited(training__lrr=1e-4))
    with pytest.raises(ValueError, match=r"training\.lr: .*could not be converted"):
        check_config(_edited(training__lr="fast"))
    with pytest.raises(ValueError, match=r"training\.lora\.r"):
        check_config(_edited(training__lora__r="eight"))


def test_a_missing_key_is_named():
    cfg = compose("method=cwac")
    OmegaConf.set_struct(cfg, False)
    del cfg.method.sae.corpus["tokens"]
    with pytest.raises(ValueError, match=r"method\.sae\.corpus\.tokens"):
        check_node(cfg.method, CWACConfig, "method")


def test_checking_leaves_the_config_as_it_was():
    cfg = compose("method=cwac")
    before = OmegaConf.to_container(cfg, resolve=True)
    check_node(cfg.training, TrainingConfig, "training")
    check_node(cfg.method, CWACConfig, "method")
    assert OmegaConf.to_container(cfg, resolve=True) == before   # no key added: config hashes unchanged


def test_run_cell_refuses_before_anything_is_written(tmp_path, tiny_cfg):
    cfg = tiny_cfg("method=cwac")
    OmegaConf.set_struct(cfg, False)
    cfg.method.activation.lamm = 1.0
    with pytest.raises(ValueError, match=r"method\.activation\.lamm"):
        run_cell(cfg)
    assert not (tmp_path / "runs").exists()


def test_cwac_basis_tol_at_its_default_keeps_the_fp32_cells_hash():
    """``method.weight.basis_tol`` only matters for bf16/fp16 models: at its default an fp32 cell
    hashes as it did before the key existed (``cwac.records.HASH_NEUTRAL``); another value does not."""
    from omegaconf import OmegaConf

    from cwac.records import config_hash
    from cwac.utils import compose_config

    cfg = compose_config("method=cwac")
    assert cfg.method.weight.basis_tol == 1.0e-2
    before_the_key = OmegaConf.create(OmegaConf.to_container(cfg))
    del before_the_key.method.weight["basis_tol"]
    assert config_hash(cfg) == config_hash(before_the_key)
    assert config_hash(compose_config("method=cwac", "method.weight.basis_tol=0.5")) != config_hash(cfg)
