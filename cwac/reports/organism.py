"""Which aligned organism a record fine-tuned: the key of its aligned artifact.

Records of two organism versions never share a table. A record's organism is the artifact it
started from (``record["info"]["alignment"]["hash"]``, stored by the cell) or, for records without
it, the hash of ``cwac.alignment.alignment_key`` of its config, computed as the cell computes it
(``cwac.experiment.align.aligned_key``). An alignment-stage defence (Vaccine) builds its own
artifact from the same recipe; its organism is the recipe's plain (SFT-aligned) artifact, so that its
row sits beside the other defences of that organism. Models without our alignment stage
(``model.align=false``: the hub chat checkpoints) have no organism version.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from cwac.alignment import alignment_key
from cwac.utils import stable_hash

log = logging.getLogger(__name__)

# Aligned-artifact keys of the organism versions named in docs/organism.md.
KNOWN = {"14801266f769": "v6"}
NO_ALIGNMENT = "none"


def computed_key(config: dict) -> str | None:
    """Hash of the aligned artifact ``config`` fine-tunes, with the alignment-stage method set to
    plain SFT (the organism's own recipe); None when the config lacks the nodes."""
    try:
        cfg = OmegaConf.create(config)
        cfg.alignment.method = {"name": "sft"}
        m = OmegaConf.to_container(cfg.model, resolve=True)
        key = alignment_key(cfg, {k: m.get(k) for k in ("source", "tiny", "gguf", "path")})
    except Exception as e:  # noqa: BLE001 - a record from another schema: no computed key
        log.debug("no organism key for a record: %s", e)
        return None
    return stable_hash(key)


def organism_key(record: dict) -> str:
    """The organism version key of a complete record (see the module docstring)."""
    config = record.get("config") or {}
    if not (config.get("model") or {}).get("align"):
        return NO_ALIGNMENT
    align_method = ((config.get("alignment") or {}).get("method") or {}).get("name", "sft")
    stored = ((record.get("info") or {}).get("alignment") or {}).get("hash")
    if stored and align_method == "sft":
        return str(stored)
    return computed_key(config) or (str(stored) if stored else "unknown")


def organism_name(key: str) -> str:
    """Display name: ``organism v6 (aligned artifact 14801266f769)``."""
    if key == NO_ALIGNMENT:
        return "no alignment stage (the checkpoint as published)"
    if key == "unknown":
        return "organism version unknown (the record names no aligned artifact, and its config gives none)"
    if key in KNOWN:
        return f"organism {KNOWN[key]} (aligned artifact {key})"
    return f"organism with aligned artifact {key} (no version name)"
