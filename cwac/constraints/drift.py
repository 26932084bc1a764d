"""Per-layer drift diagnostics of the constrained linear maps (docs/method.md §2, §3.5).

For a map ``y = W x`` the first-order output change on harmful prompts splits into a weight
term and an input (activation) term, ``Δy ≈ ΔW x₀ + W₀ Δx``. On a fixed sample of token
positions of a prompt set we record the aligned model's inputs ``X₀`` once (before training)
and, after training, report per map

* ``weight``: ``‖ΔW X₀‖ / ‖W₀ X₀‖``, what the weight constraint bounds;
* ``input``:  ``‖W₀ (X − X₀)‖ / ‖W₀ X₀‖``, the upstream drift that reaches the map;
* ``output``: ``‖W X − W₀ X₀‖ / ‖W₀ X₀‖``, the total change of the map's output.

Evaluated on held-out harmful prompts (never used for calibration) and on the calibration
prompts (where update mode bounds ``weight`` by the discarded energy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cwac.constraints.activations import forward_quietly, iter_batches, stop_after
from cwac.constraints.subspace import effective_delta, read_full, shared_inputs
from cwac.modeling import base_linear, is_lora, layer_index, model_device


class DriftProbe:
    """Token-sampled inputs of target maps on one prompt set.

    Args:
        id_lists: tokenised prompts.
        n_tokens: how many counted positions to keep (evenly spaced over the whole set).
    """

    def __init__(self, id_lists: Sequence[Sequence[int]], n_tokens: int, *, batch_size: int, pad: int,
                 skip_tokens: int = 0):
        self.ids = [list(x) for x in id_lists]
        self.batch_size, self.pad, self.skip = batch_size, pad, skip_tokens
        total = sum(max(0, len(x) - skip_tokens) for x in self.ids)
        n = min(int(n_tokens), total)
        self.keep = set(torch.linspace(0, total - 1, n).round().long().tolist()) if n > 0 else set()
        self.x0: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def inputs(self, model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """``{module: [n, d_in]}`` inputs at the sampled positions (modules reading one tensor share it)."""
        device = model_device(model)
        site_of: dict[str, str] = {}
        got: dict[str, list[torch.Tensor]] = {}
        state: dict = {}

        def make_hook(site):
            def hook(_mod, args):
                got[site].append(args[0][state["mask"]][state["sel"]].float().cpu())
            return hook

        handles = []
        was_training = model.training
        model.eval()
        offset = 0
        try:
            with stop_after(model, max(layer_index(n) for n in modules)):
                for _, batch in iter_batches(self.ids, self.batch_size, self.pad, self.skip):
                    m = int(batch.token_mask.sum())
                    sel = torch.tensor([offset + j in self.keep for j in range(m)], dtype=torch.bool)
                    offset += m
                    batch = batch.to(device)
                    if not site_of:
                        site_of = shared_inputs(model, modules, batch)
                        sites = sorted(set(site_of.values()))
                        got = {s: [] for s in sites}
                        handles = [modules[s].register_forward_pre_hook(make_hook(s)) for s in sites]
                    state.update(mask=batch.token_mask, sel=sel.to(device))
                    forward_quietly(model, batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        by_site = {s: torch.cat(v) for s, v in got.items()}
        return {n: by_site[site_of[n]] for n in modules}

    def record(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        """Store the aligned model's inputs ``X₀`` (call before training)."""
        self.x0 = self.inputs(model, modules)

    @torch.no_grad()
    def measure(self, model: nn.Module, modules: dict[str, nn.Module], w0: dict[str, torch.Tensor]) -> dict:
        """Per-map weight / input / output drift plus their means over maps."""
        x = self.inputs(model, modules)
        per: dict[str, dict] = {}
        for name, mod in modules.items():
            W0 = (base_linear(mod).weight.detach().float().cpu() if is_lora(mod) else w0[name].float().cpu())
            dW = effective_delta(mod, w0.get(name)).float().cpu()
            X0, X = self.x0[name], x[name]
            y0 = X0 @ W0.T
            den = max(float(y0.norm()), 1e-12)
            per[name] = {"weight": float((X0 @ dW.T).norm()) / den,
                         "input": float(((X - X0) @ W0.T).norm()) / den,
                         "output": float((X @ (W0 + dW).T - y0).norm()) / den}
        summary = {f"{k}_mean": sum(v[k] for v in per.values()) / len(per) for k in ("weight", "input", "output")}
        summary["weight_max"] = max(v["weight"] for v in per.values())
        return {**summary, "per_map": {n: {k: round(v, 6) for k, v in d.items()} for n, d in per.items()},
                "n_tokens": len(self.keep)}


def full_weight_copies(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``W₀`` copies (float32, CPU) of non-LoRA targets, for diagnostics."""
    return {n: read_full(m.weight).detach().float().cpu().clone() for n, m in modules.items() if not is_lora(m)}
