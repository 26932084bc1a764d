"""The floor plan: the import-linter contracts hold, every library module is under them, every
registered name resolves, and a new method is one module + one YAML + one registration line."""

from __future__ import annotations

import pkgutil
import sys
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import cwac
from cwac.api import METHODS, LossOutput, Method
from cwac.experiment import plugins
from eval.judges import JUDGES

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
ABOVE_THE_LIBRARY = {"cwac.experiment", "cwac.plan", "cwac.reports"}


def test_import_contracts_hold():
    from importlinter.cli import lint_imports

    assert lint_imports(no_cache=True) == 0   # the contracts in pyproject.toml, as `make test` runs them


def test_every_library_module_is_under_the_library_contract():
    library = next(c for c in CONTRACTS if c["name"].startswith("the library knows no defence"))
    modules = {f"cwac.{m.name}" for m in pkgutil.iter_modules(cwac.__path__)}
    assert modules - ABOVE_THE_LIBRARY == set(library["source_modules"])
    assert {"baselines", "eval", "cwac.experiment"} <= set(library["forbidden_modules"])


def test_the_library_imports_no_method_and_no_evaluator():
    """Importing the core pulls in neither the defences nor the evaluators (a lazy registry)."""
    import subprocess

    code = ("import sys, cwac.api, cwac.trainer, cwac.constraints.pool, cwac.models; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('baselines', 'eval')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_registered_name_resolves():
    for name in METHODS.names():
        assert issubclass(plugins.get_method(name), Method), name
    for name in JUDGES.names():
        plugins.get_judge(name)
    methods_with_yaml = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert methods_with_yaml == set(METHODS.names())


def test_a_lookup_miss_lists_the_valid_names():
    with pytest.raises(KeyError, match="valid methods: .*cwac.*sft"):
        plugins.get_method("nope")


class Toy(Method):
    """A toy defence: SFT plus a constant loss term, to show the three steps of adding one."""

    def compute_loss(self, model, batch, step):
        out = super().compute_loss(model, batch, step)
        return LossOutput({**out.losses, "toy": out.losses["task"] * 0 + float(self.cfg.weight)})


def test_a_new_method_is_one_module_one_yaml_one_registration(tiny_model, tmp_path):
    """What README's "Adding a baseline" says: a Method subclass in a module (this one), its YAML
    node, and one ``register_lazy`` line; then it trains through the one loop like any other."""
    from cwac.api import TrainContext
    from cwac.trainer import fit

    model, tok, fmt, cfg = tiny_model
    METHODS.register_lazy("toy", f"{__name__}:Toy")
    try:
        node = OmegaConf.create({"name": "toy", "weight": 2.5})   # what conf/method/toy.yaml would hold
        ctx = TrainContext.from_config(cfg, tokenizer=tok, formatter=fmt, store=None, run_dir=tmp_path,
                                       start_model_path="")
        method = plugins.get_method("toy")(node, ctx)
        from cwac.data.mix import build_finetune_mix

        rows = build_finetune_mix("sst2", 8, 0.25, seed=0)
        tc = OmegaConf.merge(cfg.training, {"epochs": 1, "max_steps": 1, "micro_batch_size": 4})
        res = fit(method, model, rows, tc, tokenizer=tok, formatter=fmt, seed=0)
        assert res.train.history[0]["losses/toy"] == pytest.approx(2.5)
    finally:
        METHODS._lazy.pop("toy", None)
        METHODS._items.pop("toy", None)
