"""What CWAC's activation term costs on top of a task step, and why: the task's forward/backward
alone, the regulariser's alone, and both in one backward, under each host allocator.

    python benchmarks/activation_term.py                      # the organism's shapes (~2 min)
    python benchmarks/activation_term.py --threads 1 --repeats 6

The model is built from the organism's shipped config (``conf/model/shapes/smollm2_135m.json``,
random weights: the time of a step does not depend on the values). The task batch is one packed
row shaped like a budget=cpu SST-2 mix batch (four rows, ``--task-lens``, their answers labelled,
the loop's ``response_loss``); the regulariser batch is the loop's (``make_packed_batch``: a
``--prefix``-token shared template start once, then ``--prompts`` prompts of ``--own`` tokens), cut
after block ``--layer`` and pooled at each prompt's last token through a stand-in for the selected
SAE latents (a ReLU of a ``d_model x --latents`` map; the real one is the same size). Each
measurement is one optimizer-free forward + backward; the three kinds and the two allocators
(``cwac.host_allocator``) are interleaved ``--repeats`` times, medians reported. The arithmetic floor
of the term is its share of the multiply-adds: ``prompt tokens x blocks 0..l*`` against ``task
tokens x all blocks + answer tokens x the LM head``. Writes ``results/benchmarks/activation_term.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(shapes: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(shapes.read_text())
    cfg = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                         if k not in ("architectures", "transformers_version")})
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).float().train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=str(ROOT / "conf" / "model" / "shapes" / "smollm2_135m.json"))
    ap.add_argument("--task-lens", default="60,70,80,150", help="packed task rows' token counts")
    ap.add_argument("--answer-lens", default="3,3,3,100", help="labelled answer tokens at each row's end")
    ap.add_argument("--prefix", type=int, default=24, help="shared template tokens of the regulariser prompts")
    ap.add_argument("--prompts", type=int, default=8, help="regulariser prompts a step (activation.batch_prompts)")
    ap.add_argument("--own", type=int, default=19, help="each prompt's own tokens after the shared prefix")
    ap.add_argument("--layer", type=int, default=15, help="l*: the block whose output the SAE reads")
    ap.add_argument("--latents", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "activation_term.json"))
    args = ap.parse_args()

    import torch

    from cwac.constraints.activations import make_packed_batch
    from cwac.constraints.sae import batch_latents
    from cwac.host_allocator import set_host_allocator
    from cwac.losses import response_loss
    from cwac.utils import host_info

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(Path(args.shapes))
    vocab, d_model = model.config.vocab_size, model.config.hidden_size
    n_layers = model.config.num_hidden_layers

    lens = [int(x) for x in args.task_lens.split(",")]
    answers = [int(x) for x in args.answer_lens.split(",")]
    ids = torch.randint(0, vocab, (1, sum(lens)))
    labels = torch.full_like(ids, -100)
    start = 0
    for n, a in zip(lens, answers):
        labels[0, start + n - a: start + n] = ids[0, start + n - a: start + n]
        start += n
    task = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}

    shared = torch.randint(0, vocab, (args.prefix,)).tolist()
    prompts = [shared + torch.randint(0, vocab, (args.own,)).tolist() for _ in range(args.prompts)]
    reg = make_packed_batch(prompts, args.prefix)
    w_lat = torch.randn(d_model, args.latents) / d_model ** 0.5

    def latents(x):
        return torch.relu(x @ w_lat)

    def loss(kind: str) -> torch.Tensor:
        out = torch.zeros(())
        if kind in ("task", "both"):
            out = out + response_loss(model, task)
        if kind in ("regulariser", "both"):
            z = batch_latents(model, args.layer, reg, latents, "last", early_exit=True)
            out = out + 0.5 * z.pow(2).sum(-1).mean()
        return out

    def step(kind: str) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss(kind).backward()
        return time.perf_counter() - t

    kinds, allocators = ("task", "regulariser", "both"), ("retain", "glibc")
    times = {(a, k): [] for a in allocators for k in kinds}
    for a in allocators:   # warm-up
        set_host_allocator(a)
        for k in kinds:
            step(k)
    for _ in range(args.repeats):
        for a in allocators:
            set_host_allocator(a)
            for k in kinds:
                times[(a, k)].append(step(k))
    med = {a: {k: round(statistics.median(times[(a, k)]), 4) for k in kinds} for a in allocators}

    n_task, n_reg, n_ans = sum(lens), int(reg.input_ids.shape[1]), sum(answers)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    head = vocab * d_model
    floor = n_reg * (args.layer + 1) * per_block / (n_task * n_layers * per_block + n_ans * head)
    result = {
        "shapes": Path(args.shapes).name, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "task_tokens": n_task, "answer_tokens": n_ans, "regulariser_tokens": n_reg, "layer": args.layer,
        "median_seconds": med,
        "regulariser_share_of_task_step": {a: {
            "alone": round(med[a]["regulariser"] / med[a]["task"], 3),
            "added_to_the_task_backward": round((med[a]["both"] - med[a]["task"]) / med[a]["task"], 3)}
            for a in allocators},
        "arithmetic_floor_share": round(floor, 3),
        "retain_vs_glibc": {k: round(med["retain"][k] / med["glibc"][k], 3) for k in kinds},
        "machine": {**host_info(), "loadavg_at_end": os.getloadavg()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "regulariser_share_of_task_step",
                                             "arithmetic_floor_share")}, indent=1), "\nwrote", out)


if __name__ == "__main__":
    main()
