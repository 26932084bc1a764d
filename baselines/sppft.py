"""SPPFT: Safely Partial-Parameter Fine-Tuning (Li et al., "Safety Layers in Aligned Large Language
Models: The Key to LLM Security", arXiv 2408.17003). No official code was found.

Every parameter of a contiguous band of decoder layers ("safety layers") ``[first, last]``
(0-indexed, inclusive) is frozen before the optimizer and the DeepSpeed engine are built
(``configure_model``); the rest is fine-tuned as usual.

Which band (first match wins):
  1. ``method.band`` — an explicit ``[first, last]``;
  2. ``method.prefer_located: true`` (``budget=paper``) — the locator below on the start model
     (cached), for every model; a band of ``method.bands`` (for Llama-2 and Llama-3 recalled from
     the paper, not verified) is kept only as a comparison in the record (``recalled_band``);
  3. ``method.bands[model.name]`` — per-model bands written in the YAML (with their source);
  4. ``method.locate_if_missing: true`` — the locator, for a model missing from ``bands``;
  5. ``method.relative_band: [a, b]`` — layers ``floor(a L) .. ceil(b L) - 1`` of an L-layer model.

Locator (the paper's step 1; step 2, refining the bounds by scaling candidate bands and counting
over-rejections, is not implemented): for N normal and M malicious prompts, take the hidden
state of the last prompt position after every layer; per layer, average the cosine similarity
of normal-normal, malicious-malicious and normal-malicious pairs. The gap
``cos(N,N) - cos(N,M)`` opens where the model starts to tell the two apart. The band is the run
of consecutive layers that raise the gap by more than ``rise_tol`` each with the largest total
rise, capped at ``max_width_fraction`` of the depth (the paper's bands span 15-25% of the
layers). Run it on any configured model (it loads the start model, i.e. builds the aligned
artifact first if needed):

    python -m cwac.experiment.locate_sppft model=smollm2_135m   # prints the curves and the band
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch

from cwac.modeling import decoder_layers
from cwac.data.examples import Example
from cwac.data.harmful import assert_disjoint, held_in_harmful_prompts, prompt_set
from cwac.data.prompts import collate_prompts, pad_id
from cwac.api import Method

log = logging.getLogger(__name__)


# ---- locator --------------------------------------------------------------------------------
@torch.no_grad()
def last_position_states(model, formatter, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """(L + 1, N, d): hidden state of the last prompt token after the embeddings and every layer."""
    pad = pad_id(formatter.tok)
    was_training = model.training
    model.eval()
    chunks = []
    for i in range(0, len(prompts), batch_size):
        ids = [formatter.prompt_ids(Example(p)) for p in prompts[i: i + batch_size]]
        batch = collate_prompts(ids, pad)  # left padded: position -1 is every prompt's last token
        out = model(**batch, output_hidden_states=True)
        chunks.append(torch.stack([h[:, -1].float() for h in out.hidden_states]))
    model.train(was_training)
    return torch.cat(chunks, dim=1)


def mean_pair_cosine(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Per layer mean cosine over pairs: within X (i != j) when Y is None, else across X x Y.
    X, Y: (L, N, d) -> (L,)."""
    Xn = torch.nn.functional.normalize(X.double(), dim=-1)
    if Y is None:
        n = Xn.shape[1]
        S = Xn @ Xn.transpose(1, 2)
        return (S.sum((1, 2)) - S.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    Yn = torch.nn.functional.normalize(Y.double(), dim=-1)
    return (Xn @ Yn.transpose(1, 2)).mean((1, 2))


def band_from_gap(gap: list[float], rise_tol: float, max_width: int) -> tuple[int, int] | None:
    """Decoder-layer band from the gap curve over hidden states 0..L (0 = embeddings).

    Layer l raises the gap by ``gap[l + 1] - gap[l]``. Take the run of consecutive layers each
    raising it by more than ``rise_tol`` with the largest total rise; keep at most ``max_width``
    layers from its start. None when no layer raises the gap.
    """
    rises = [gap[i + 1] - gap[i] for i in range(len(gap) - 1)]
    best, best_total, i = None, 0.0, 0
    while i < len(rises):
        if rises[i] > rise_tol:
            j = i
            while j + 1 < len(rises) and rises[j + 1] > rise_tol:
                j += 1
            total = sum(rises[i: j + 1])
            if total > best_total:
                best, best_total = (i, j), total
            i = j + 1
        else:
            i += 1
    if best is None:
        return None
    return best[0], min(best[1], best[0] + max(1, max_width) - 1)


def locate_safety_layers(model, formatter, normal: list[str], malicious: list[str], rise_tol: float = 1e-3,
                         max_width_fraction: float = 0.25, batch_size: int = 16) -> dict:
    """The Safety Layers paper's step 1 on ``model``; returns the curves and the band."""
    if len(normal) < 2 or len(malicious) < 2:
        raise ValueError("the locator needs at least 2 normal and 2 malicious prompts")
    Hn = last_position_states(model, formatter, normal, batch_size)
    Hm = last_position_states(model, formatter, malicious, batch_size)
    nn_, mm, nm = mean_pair_cosine(Hn), mean_pair_cosine(Hm), mean_pair_cosine(Hn, Hm)
    gap = (nn_ - nm).tolist()
    n_layers = Hn.shape[0] - 1
    max_width = max(1, math.ceil(max_width_fraction * n_layers))
    band = band_from_gap(gap, rise_tol, max_width)
    return {"n_layers": n_layers, "band": list(band) if band else None, "rise_tol": rise_tol,
            "max_width": max_width, "n_normal": len(normal), "n_malicious": len(malicious),
            "cos_nn": nn_.tolist(), "cos_mm": mm.tolist(), "cos_nm": nm.tolist(), "gap": gap,
            "note": "curves index hidden states 0..L (0 = embeddings); band indexes decoder layers 0..L-1"}


def locator_prompts(lcfg) -> tuple[list[str], list[str]]:
    """Seeded normal (held-in harmless set) and malicious (held-in harmful) prompts."""
    rng = random.Random(int(lcfg.seed))
    normal = list(prompt_set(lcfg.normal_set))
    malicious = held_in_harmful_prompts()
    n = int(lcfg.n_prompts)
    if n > min(len(normal), len(malicious)):
        raise ValueError(f"locate.n_prompts={n} but only {len(normal)} normal / {len(malicious)} malicious prompts exist")
    malicious = rng.sample(malicious, n)
    assert_disjoint(malicious)
    return rng.sample(normal, n), malicious


def located_band(store, model_path: str, model, formatter, lcfg) -> dict:
    """The locator's result for the model at ``model_path``, as a cached artifact."""
    from omegaconf import OmegaConf

    key = {"model": str(model_path), "locate": OmegaConf.to_container(lcfg, resolve=True), "version": 1}

    def build(out: Path) -> dict:
        normal, malicious = locator_prompts(lcfg)
        res = locate_safety_layers(model, formatter, normal, malicious, float(lcfg.rise_tol),
                                   float(lcfg.max_width_fraction), int(lcfg.batch_size))
        (out / "safety_layers.json").write_text(json.dumps(res, indent=2) + "\n")
        return {"band": res["band"]}

    return json.loads((store.get_or_build("safety_layers", key, build) / "safety_layers.json").read_text())


# ---- the method ----------------------------------------------------------------------------
def relative_band(a: float, b: float, n_layers: int) -> tuple[int, int]:
    first = math.floor(a * n_layers)
    last = max(first, math.ceil(b * n_layers) - 1)
    return first, min(last, n_layers - 1)


class SPPFT(Method):
    stages = ("finetune",)

    def resolve_band(self, model) -> tuple[tuple[int, int], str]:
        """The band and where it came from (module doc); with ``prefer_located`` a recalled band of
        ``method.bands`` is left in ``self.recalled`` for the record."""
        n_layers = len(decoder_layers(model))
        name = self.ctx.model_name
        bands = self.cfg.bands or {}
        self.recalled = None
        if self.cfg.band is not None:
            band, source = tuple(self.cfg.band), "method.band"
        elif self.cfg.prefer_located:
            band, source = self._located(model, "method.prefer_located=false"), "locator (Safety Layers step 1; prefer_located)"
            if name in bands:
                rec = [int(x) for x in bands[name].layers]
                self.recalled = {"band": rec, "source": f"method.bands.{name} ({bands[name].source})",
                                 "agrees": rec == [int(x) for x in band], "used": False}
        elif name in bands:
            band, source = tuple(bands[name].layers), f"method.bands.{name} ({bands[name].source})"
        elif self.cfg.locate_if_missing:
            band, source = self._located(model, "method.locate_if_missing=false"), "locator (Safety Layers step 1)"
        else:
            band, source = relative_band(*self.cfg.relative_band, n_layers), f"relative_band {list(self.cfg.relative_band)}"
        first, last = int(band[0]), int(band[1])
        if not 0 <= first <= last < n_layers:
            raise ValueError(f"SPPFT band [{first}, {last}] ({source}) is not inside the model's {n_layers} layers")
        return (first, last), source

    def _located(self, model, other_fix: str) -> tuple[int, int]:
        """The locator's band for the start model (an artifact: built once per model and config)."""
        res = located_band(self.ctx.store, self.ctx.start_model_path, model, self.ctx.formatter, self.cfg.locate)
        if res["band"] is None:
            raise ValueError("the safety-layer locator found no layer that opens the normal/malicious gap; "
                             f"set method.band explicitly, or {other_fix}")
        return tuple(res["band"])

    def configure_model(self, model):
        (first, last), source = self.resolve_band(model)
        layers = decoder_layers(model)
        frozen = 0
        for i in range(first, last + 1):
            for p in layers[i].parameters():
                if p.requires_grad:
                    frozen += p.numel()
                p.requires_grad_(False)
        self.info = {"band": [first, last], "source": source, "n_layers": len(layers), "frozen_params": frozen,
                     "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if self.recalled is not None:
            self.info["recalled_band"] = self.recalled
        log.info("SPPFT: froze decoder layers %d-%d of %d (%s)", first, last, len(layers), source)
        return model

    def record_info(self) -> dict:
        return getattr(self, "info", {})

    @classmethod
    def planned_memory(cls, cfg, spec) -> dict[str, int]:
        """SPPFT holds nothing extra; its frozen band has no gradients and no optimizer state, a
        negative entry (docs/scale.md). The band as ``resolve_band`` picks it without the locator
        (which the plan does not run: a recalled band, else ``relative_band``, stands in for it,
        with ``prefer_located`` too)."""
        from cwac.memory import key

        s = spec.shapes
        bands = cfg.bands or {}
        if cfg.band is not None:
            first, last = int(cfg.band[0]), int(cfg.band[1])
        elif s.name in bands:
            first, last = (int(x) for x in bands[s.name].layers)
        else:
            first, last = relative_band(*cfg.relative_band, s.n_layers)
        frozen = (last - first + 1) * s.layer_params
        rest = spec.with_(trainable_params=max(0, spec.trainable - frozen))
        name = f"frozen band {first}-{last}: no gradients or optimizer state"
        return {key(name, host=h): rest.optimizer_bytes(w) - spec.optimizer_bytes(w)
                for h, w in ((False, "device"), (True, "host")) if spec.optimizer_bytes(w)}
