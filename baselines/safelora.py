"""SafeLoRA: project fine-tuning updates onto the alignment subspace after training
(Hsu et al., arXiv 2405.16833; reference code ``IBM/SafeLoRA/model.py``).

For every targeted matrix with update Delta W, ``cos = cos(vec(C Delta W), vec(Delta W))`` with the
shared ``C = V V^T / ||V||_F`` (``baselines._weights``). Matrices whose update points away from the
alignment direction are projected:

  * ``select: number``  -> the ``k`` lowest cosines (the reference default, k = 10). ``k`` is a
    count (an integer) or a fraction of the targeted matrices (a number in (0, 1), rounded):
    the reference projects 10 of Llama-2's 64 LoRA q,v maps, so at paper scale ``k = 10/64``
    (``budget=paper``: conf/method_budget/safelora/paper.yaml), 35 of the 224 maps that full fine-tuning trains at 7B;
  * ``select: threshold`` -> every matrix with ``cos <= tau`` (tau = 0.5 in the paper).

LoRA: ``B <- C B`` (so Delta W = B A becomes C B A). Full fine-tuning (our port, docs/baselines.md):
``W <- W_aligned + C (W - W_aligned)``, with W_aligned read back from the start checkpoint.

Unlike the reference, all cosines are computed once from the original fine-tuned weights and the
projection is applied once afterwards (``IBM/SafeLoRA#2``: its number mode already projects during
the cosine-gathering pass). Matrices are matched by name, not by parameter order. A matrix whose
update is exactly zero has no cosine and is left alone. Which matrices were projected, and every
cosine, go into the result record.

ZeRO-3: each matrix (and its LoRA factors) is gathered while it is read, and edited under
``GatheredParameters(modifier_rank=0)`` so that the projection is re-partitioned on every rank
(a no-op for ordinary parameters, e.g. after the loop has given the module its full weights back).
"""

from __future__ import annotations

import logging
import math

import torch

from baselines._common import adapted_targets, gathered, read_tensors
from cwac.modeling import base_weight, is_lora, linear_modules, lora_factors
from baselines._weights import alignment_subspace, planned_subspace
from baselines.asft import check_subspace_settings
from cwac.api import Method
from cwac.schema import ConfigError

log = logging.getLogger(__name__)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _lora_delta(module) -> torch.Tensor:
    """B A (the alpha/r scaling does not change a cosine, and B <- C B is scale-free)."""
    B, A, _ = lora_factors(module)
    return B.float() @ A.float()


def resolve_k(k, n_matrices: int) -> int:
    """``method.k`` as a count: an integer >= 0 as it is, a number in (0, 1) as that fraction of
    ``n_matrices``, rounded half up (not Python's half-to-even ``round``: 0.25 of 10 is 3), at least 1."""
    if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
        return k
    if isinstance(k, float) and 0 < k < 1:
        return max(1, math.floor(k * n_matrices + 0.5))
    raise ValueError(f"method.k={k!r} is neither a count (an integer >= 0) nor a fraction in (0, 1); "
                     "e.g. method.k=10, or method.k=0.15625 for 10 of 64")


def select_layers(cosines: dict[str, float], mode: str, k: int, tau: float) -> list[str]:
    """Names to project: ``number`` -> the k lowest cosines; ``threshold`` -> cos <= tau."""
    if mode == "number":
        return sorted(cosines, key=lambda n: (cosines[n], n))[: max(0, int(k))]
    if mode == "threshold":
        return sorted(n for n, c in cosines.items() if c <= tau)
    raise ValueError(f"method.select must be 'number' or 'threshold', got {mode!r}")


class SafeLoRA(Method):
    stages = ("finetune",)

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """``select`` and its ``k`` / ``tau``, and the alignment subspace's settings."""
        if node.select not in ("number", "threshold"):
            raise ConfigError(f"config {key}.select={node.select!r} is not valid; valid values: number, threshold")
        if node.select == "number":
            try:
                resolve_k(node.k, 1)
            except ValueError as e:
                raise ConfigError(f"config {e}") from None
        elif isinstance(node.tau, bool) or not isinstance(node.tau, (int, float)):
            raise ConfigError(f"config {key}.tau={node.tau!r} is not valid: select=threshold needs a number, "
                              f"e.g. {key}.tau=0.5")
        check_subspace_settings(node, cfg, key)

    def prepare(self, model) -> None:
        tc = self.ctx.training
        self.lora = bool(tc.lora.enabled)
        self.targets = adapted_targets(self.cfg.targets, tc)
        self.subspace = alignment_subspace(self.ctx, self.targets, self.cfg.normalize)
        self.info: dict = {}

    def _aligned(self, name: str) -> torch.Tensor:
        """W_aligned of one matrix, read back from the start checkpoint (float32, CPU)."""
        w = f"{name}.weight"
        return read_tensors(str(self.ctx.start_model_path), [w], self.ctx.hub_ok)[w]

    def _delta(self, name: str, module) -> torch.Tensor:
        """This matrix's update in float32: B A under LoRA, W - W_aligned under full fine-tuning."""
        if self.lora:
            B, A, _ = lora_factors(module)
            with gathered([B, A]):
                return _lora_delta(module)
        W = base_weight(module)
        with gathered([W]):
            return W.float() - self._aligned(name).to(W.device)

    @torch.no_grad()
    def post_train(self, model):
        modules = linear_modules(model, self.targets)
        if self.lora:
            not_adapted = [n for n, m in modules.items() if not is_lora(m)]
            if not_adapted:
                raise ValueError(f"SafeLoRA under LoRA projects B, but {not_adapted[:3]} are not LoRA-adapted; "
                                 "set method.targets=auto or a subset of training.lora.target_modules")
        # 1) every cosine from the original fine-tuned weights, one matrix at a time ...
        cosines = {}
        for n, m in modules.items():
            d = self._delta(n, m)
            if float(d.abs().max()) == 0.0:
                continue
            cosines[n] = flat_cosine(self.subspace[n].to(d.device).apply(d), d)
        k = resolve_k(self.cfg.k, len(modules))
        chosen = select_layers(cosines, self.cfg.select, k, float(self.cfg.tau))
        # 2) ... then one projection per chosen matrix (each from its own, still original, update)
        for n in chosen:
            m = modules[n]
            if self.lora:
                B = lora_factors(m)[0]
                with gathered([B], modifier_rank=0):
                    B.copy_(self.subspace[n].to(B.device).apply(B.float()).to(B.dtype))
            else:
                d = self._delta(n, m)
                W = base_weight(m)
                with gathered([W], modifier_rank=0):
                    W.copy_((self._aligned(n).to(W.device) + self.subspace[n].to(W.device).apply(d)).to(W.dtype))
        self.info = {"mode": self.cfg.select, "k": k, "k_config": self.cfg.k, "tau": float(self.cfg.tau),
                     "targets": self.targets, "delta_w": "B A" if self.lora else "W - W_aligned",
                     "normalize": self.cfg.normalize, "n_matrices": len(modules), "n_projected": len(chosen),
                     "projected": chosen, "cosines": {n: round(c, 6) for n, c in cosines.items()}}
        log.info("SafeLoRA projected %d of %d matrices: %s", len(chosen), len(modules), chosen)
        return model

    def record_info(self) -> dict:
        return self.info

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """SafeLoRA's own tensors, after training (docs/scale.md): the reference C / F of every map
        (float32 on the CPU, as loaded), and one map at a time on the device: its aligned weight, its
        update and the projected update in float32."""
        from cwac.memory import key

        shapes, ref = planned_subspace(cfg.targets, spec)
        o, i = max(shapes, key=lambda oi: oi[0] * oi[1])
        return {key("reference C / F (fp32, CPU)", "post_train", host=True): ref * 4,
                key("one map: aligned W, Delta W, C Delta W (fp32)", "post_train"): 3 * o * i * 4
                + (o * i if o > i else o * o) * 4}
