"""The versioned sweeps (conf/sweep/*.yaml) describe the paper's tables: each composes into a
Hydra multirun with the right axes, a paper-scale and a CPU form, >= 3 seeds, a sweep name
(W&B group), and only config options that exist. The launcher configs resolve to their
plugins."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from cwac.utils import compose_config
from tests.conftest import CONF_DIR

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))
PAPER_MODELS = {"llama2_7b_chat", "llama3_8b_instruct", "mistral_7b_instruct", "gemma2_9b_it"}


def sweep_cfg(name: str, *overrides: str):
    return _hydra_compose(f"+sweep={name}", *overrides)


def _hydra_compose(*overrides: str):
    return compose_config(*overrides, return_hydra_config=True)


def axes(cfg) -> dict[str, list[str]]:
    """Swept values per key, as the basic sweeper will expand them."""
    parser = OverridesParser.create()
    out = {}
    for k, v in cfg.hydra.sweeper.params.items():
        ov = parser.parse_override(f"{k}={v}")
        out[k] = [str(x) for x in ov.sweep_string_iterator()] if ov.is_sweep_override() else [str(v)]
    return out


def _options(group: str) -> set[str]:
    return {p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")}


def test_one_sweep_per_table_in_both_forms():
    assert {f"{t}_{f}" for t in ("main", "ratio", "ablation", "generalisation") for f in ("cpu", "paper")} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_is_a_documented_multirun_with_seeds_and_a_name(name):
    text = (Path(CONF_DIR) / "sweep" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n#") and f"python run.py +sweep={name}" in text
    cfg = sweep_cfg(name)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.sweep_name == name                                  # W&B group of every cell
    assert f"/_hydra/{name}/" in cfg.hydra.sweep.dir               # the table's name in the sweep folder
    ax = axes(cfg)
    assert len(ax["seed"]) >= 3
    for group in ("model", "task", "harmful"):                      # every swept option exists
        assert set(ax.get(group, [])) <= _options(group), (name, group)


@pytest.mark.parametrize("name", SWEEPS)
def test_paper_and_cpu_forms(name):
    cfg = sweep_cfg(name)
    ax = axes(cfg)
    models = set(ax.get("model", [cfg.model.name]))
    if name.endswith("_paper"):
        assert models == (PAPER_MODELS - {"mistral_7b_instruct"} if name.startswith("ablation") else
                          {"llama2_7b_chat"} if name.startswith("ratio") else PAPER_MODELS)
        n = 500 if name.startswith("generalisation") else 5000    # PQA-L has 500 train rows
        assert (cfg.harmful.n_total, cfg.training.epochs, cfg.training.micro_batch_size, cfg.training.max_len) == \
            (n, 3, 1, 512)                                           # docs/method.md §6.3
        assert cfg.harmful.source == "hub" and cfg.offline is False  # 500+ harmful rows need the hub split
    else:
        assert models == {"smollm2_135m"} and cfg.harmful.n_total == 400 and cfg.training.epochs == 1


def test_table_axes():
    ratio = axes(sweep_cfg("ratio_cpu"))
    assert set(ratio["harmful"]) == {"p0.05", "p0.1", "p0.2", "p0.5"} and sweep_cfg("ratio_cpu").task.name == "sst2"
    assert {"sft", "cwac"} <= set(ratio["method"])
    for form in ("cpu", "paper"):
        main = sweep_cfg(f"main_{form}")
        assert main.harmful.ratio == 0.1 and "harmful" not in axes(main)
        assert set(axes(main)["task"]) == {"sst2", "agnews", "gsm8k"}
        assert {"sft", "asft", "safeinstr", "sppft", "cwac"} <= set(axes(main)["method"])
        assert set(axes(sweep_cfg(f"ablation_{form}"))["method"]) == {"cwac", "cwac_weight_only", "cwac_act_only"}
        gen = sweep_cfg(f"generalisation_{form}")
        assert gen.harmful.ratio == 0.1 and set(axes(gen)["method"]) == {"sft", "cwac"}
    assert sweep_cfg("generalisation_cpu").task.name == "pubmedqa"     # AE needs a judge: none offline
    assert set(axes(sweep_cfg("generalisation_paper"))["task"]) == {"pubmedqa", "alpaca_eval"}


def test_cell_counts():
    """The documented sizes: the product of the swept axes."""
    counts = {n: len(list(itertools.product(*axes(sweep_cfg(n)).values()))) for n in SWEEPS}
    assert counts == {"ratio_cpu": 84, "ratio_paper": 36, "main_cpu": 63, "main_paper": 180, "ablation_cpu": 27,
                      "ablation_paper": 81, "generalisation_cpu": 6, "generalisation_paper": 48, "lr_cpu": 18}


def test_swept_methods_have_configs():
    """Methods are written in parallel; a sweep naming one that has not landed cannot launch."""
    named = set().union(*(axes(sweep_cfg(n))["method"] for n in SWEEPS))
    missing = sorted(named - _options("method"))
    if missing:
        pytest.skip(f"methods named by the sweeps without conf/method/<name>.yaml yet: {missing}")


def test_command_line_narrows_a_sweep():
    """`+sweep=ratio_cpu seed=42 model=tiny` keeps the sweep's other axes and settings."""
    cfg = sweep_cfg("ratio_cpu", "model=tiny", "budget=smoke")
    assert cfg.model.name == "tiny" and cfg.harmful.n_total == 40 and cfg.sweep_name == "ratio_cpu"


@pytest.mark.parametrize("launcher,target", [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launchers_resolve_to_their_plugins(launcher, target):
    import importlib

    cfg = sweep_cfg("main_paper", f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_ == target
    module, cls = target.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), cls)            # the plugin is installed
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
    else:
        assert cfg.hydra.launcher.n_jobs == 2


def test_default_launcher_is_sequential():
    assert _hydra_compose("+sweep=ratio_cpu").hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.parametrize("name", SWEEPS)
def test_every_swept_value_composes(name):
    """What Hydra validates before launching: each swept value composes and resolves."""
    from omegaconf import OmegaConf

    methods = _options("method")
    for key, values in axes(sweep_cfg(name)).items():
        for v in values:
            if key == "method" and v not in methods:
                continue  # reported by test_swept_methods_have_configs
            cfg = sweep_cfg(name, f"{key}={v}")
            OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
            if key == "seed":
                assert cfg.seed == int(v)
            elif key == "harmful":
                assert cfg.harmful.ratio == float(v[1:])
            elif "." in key:                                    # a value sweep, e.g. training.lr
                assert OmegaConf.select(cfg, key) == float(v)
            else:
                assert cfg[key].name == v
