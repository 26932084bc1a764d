"""Run one experiment cell (or a multirun) of the CWAC reproduction.

    python run.py                                   # organism, SST-2, p=0.1, SFT (CPU budget)
    python run.py model=tiny budget=smoke           # smoke run on the tiny Llama
    python run.py method=sft harmful=p0.2 task=agnews seed=1
    python run.py stage=align                       # build/reuse + evaluate the aligned organism
    python run.py -m harmful=p0.05,p0.1,p0.2,p0.5   # multirun

Each run writes ``<paths.runs>/<cell>-<hash>/record.json`` (+ samples, train_log.jsonl,
W&B offline files) and appends a row to ``<paths.runs>/index.jsonl``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from cwac.experiment.cell import run_cell

    record = run_cell(cfg)
    m = record["metrics"]
    if not m:  # a rank other than 0 of a multi-rank run: rank 0 evaluates and reports
        return None
    fmt = lambda v: "not scored" if v is None else f"{v:.1f}%"  # noqa: E731
    print(f"\n[{record['cell']}]  HS = {fmt(m.get('hs'))}  FA = {fmt(m.get('fa'))}  "
          f"over-refusal = {fmt(m.get('over_refusal'))}  (judge: {m['judge']['name']}, backend: {m['backend']})")
    print(f"record: {record['run_dir']}/record.json")
    return m.get("hs")


if __name__ == "__main__":
    import sys

    # the `deepspeed` launcher appends --local_rank=N (it also sets LOCAL_RANK); Hydra must not see it
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
