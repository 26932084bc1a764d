"""One rank of a ``tests/distributed/harness.py`` job: compose the tiny config, build the method,
run ``cwac.trainer.fit`` and write this rank's JSON (and, on rank 0, the trained weights).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py SPEC.json
    python tests/distributed/worker.py SPEC.json          # one process (the ZeRO-0 reference)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    from cwac.api import TrainContext
    from cwac.artifacts import ArtifactStore
    from cwac.data.mix import build_finetune_mix
    from cwac.experiment.plugins import get_method
    from cwac.models import load_chat_model, resolve_model_path
    from cwac.trainer import fit, init_distributed
    from cwac.utils import compose_config, seed_everything

    rank, world = init_distributed()
    method_name = spec.get("method", "sft")
    stage = spec.get("stage", "finetune")
    cfg = compose_config("model=tiny", "budget=smoke", "logger=none", f"method={method_name}",
                         f"paths.artifacts={spec['artifacts']}", f"paths.runs={spec['runs']}", *spec.get("overrides", []))
    store = ArtifactStore(cfg.paths.artifacts)
    path = resolve_model_path(cfg.model, store)
    seed_everything(0)
    model, tok, fmt = load_chat_model(path, cfg.model)
    ctx = TrainContext.from_config(cfg, stage=stage, tokenizer=tok, formatter=fmt, store=store,
                                   run_dir=Path(spec["out"]), start_model_path=str(path),
                                   base_model_path=spec.get("base_model_path"))   # AsFT / SafeLoRA's reference
    method = get_method(method_name)(cfg.method, ctx)
    rows = build_finetune_mix("sst2", int(spec.get("n_rows", 16)), 0.25, seed=0)
    out = Path(spec["out"])
    if rank == 0:   # the start weights, to tell what moved
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous().clone() for n, p in model.named_parameters()},
                  str(out / "weights0.safetensors"))
    if spec.get("kill_after") is not None:   # every rank dies inside the step after that many (tests/distributed/test_resume.py)
        def after_step(model_, step):
            if step == int(spec["kill_after"]):
                raise SystemExit(3)
            return {}
        method.after_step = after_step
    res = fit(method, model, rows, cfg.training, tokenizer=tok, formatter=fmt, seed=int(cfg.seed), desc="dist",
              resume_dir=spec.get("resume_dir"))
    info = {"rank": rank, "world": world, "history": res.train.history, "steps": res.train.steps,
            "resumed_from": res.train.resumed_from,
            "record_info": method.record_info(),
            # parameters ZeRO-3 split over the ranks during training (the rest stayed whole)
            "zero3_partitioned": sorted(n for n, p in res.model.named_parameters()
                                        if hasattr(p, "ds_persist") and not p.ds_persist)}
    (out / f"rank{rank}.json").write_text(json.dumps(info, default=str, indent=1))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous().clone() for n, p in res.model.named_parameters()},
                  str(out / "weights.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
