"""Every option of every config group composes; bad names fail with the valid list."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose

GROUPS = ["model", "task", "harmful", "method", "training", "alignment", "eval", "judge", "logger", "paths", "budget"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose(f"{group}={option}", runs=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.model.name and cfg.task.name and cfg.method.name
    assert 0.0 <= cfg.harmful.ratio <= 1.0


def test_every_yaml_starts_with_a_comment():
    for p in Path(CONF_DIR).rglob("*.yaml"):
        first = p.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{p} must start with a comment saying what it changes and how to run it"


def test_harmful_groups_cover_the_paper_ratios():
    assert {compose(f"harmful={o}").harmful.ratio for o in _options("harmful")} >= {0.0, 0.05, 0.1, 0.2, 0.5}


def test_unknown_method_lists_valid_ones():
    from cwac.experiment.plugins import get_method

    with pytest.raises(KeyError, match="valid methods: .*sft"):
        get_method("nope")


def test_run_py_unknown_method_fails_fast_with_options():
    root = Path(CONF_DIR).parent
    r = subprocess.run([sys.executable, "run.py", "method=nope"], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "method/nope" in r.stderr and "sft" in r.stderr  # Hydra lists the available options


PRESETS = [f"budget={o}" for o in _options("budget")] + [f"+sweep={o}" for o in _options("sweep")]
# what identifies each group's option in the composed config
IDENTITY = {"model": "model.name", "task": "task.name", "method": "method.name", "judge": "judge.name",
            "logger": "logger.name", "harmful": "harmful.ratio", "training": "training.lora.enabled"}


@functools.lru_cache(maxsize=None)
def _identity(group: str, option: str):
    return OmegaConf.select(compose(f"{group}={option}"), IDENTITY[group])


@pytest.mark.parametrize("preset", PRESETS)
def test_command_line_group_choices_win_over_a_preset(preset):
    """README and conf/config.yaml: command-line overrides win over all. A preset sets sizes; a
    group option chosen on the command line (`budget=smoke logger=wandb`) is the one composed.
    Every option of the loggers (smoke once forced logger.name=none), and for each other group an
    option the preset does not compose by itself."""
    alone = compose(preset)
    for group in IDENTITY:
        others = [o for o in _options(group) if _identity(group, o) != OmegaConf.select(alone, IDENTITY[group])]
        options = _options(group) if group == "logger" else others[:1]
        assert options, group
        for option in options:
            got = OmegaConf.select(compose(preset, f"{group}={option}"), IDENTITY[group])
            assert got == _identity(group, option), f"{preset} {group}={option}: {IDENTITY[group]} = {got!r}"
