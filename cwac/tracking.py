"""Run logging: a local ``train_log.jsonl`` always (tables and curves come from files, never
from W&B), plus W&B when ``logger=wandb`` (offline by default, its files inside the run
folder). The W&B run is grouped by sweep and tagged by the cell's axes. The log is strict JSON:
a non-finite value is written as null and its key listed under ``nonfinite``."""

from __future__ import annotations

import os
from pathlib import Path

from cwac.utils import strict_json


class RunLogger:
    def __init__(self, lcfg, run_dir: Path, config: dict, name: str, group: str | None, tags: list[str],
                 enabled: bool = True):
        """``enabled=False`` (ranks other than 0) logs nothing anywhere."""
        self.path = Path(run_dir) / "train_log.jsonl"
        self._f = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        if lcfg.name == "wandb":
            wdir = Path(run_dir) / "wandb"
            wdir.mkdir(parents=True, exist_ok=True)
            for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
                os.environ.setdefault(var, str(wdir))
            os.environ.setdefault("WANDB_MODE", lcfg.mode)
            import wandb

            self.wandb = wandb.init(project=lcfg.project, entity=lcfg.entity, dir=str(wdir), mode=lcfg.mode,
                                    name=name, group=group, tags=tags, config=config, reinit="finish_previous")

    def log(self, data: dict, step: int | None = None) -> None:
        if self._f is None:
            return
        self._f.write(strict_json({"step": step, **data}) + "\n")   # NaN -> null, listed under "nonfinite"
        self._f.flush()
        if self.wandb is not None:
            self.wandb.log(data, step=step)

    def summary(self, data: dict) -> None:
        if self.wandb is not None:
            for k, v in data.items():
                self.wandb.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
