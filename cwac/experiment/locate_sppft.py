"""Locate the safety layers of a configured model (SPPFT's band; Li et al., arXiv 2408.17003):

    python -m cwac.experiment.locate_sppft model=smollm2_135m threads=1

Prints the per-layer curves and the band as JSON; the result is cached as an artifact, which
``method.locate_if_missing=true`` reuses.
"""

from __future__ import annotations

import json
import logging
import sys

from baselines.sppft import located_band
from cwac.artifacts import ArtifactStore
from cwac.experiment.align import start_model
from cwac.experiment.cell import setup_env
from cwac.models import load_chat_model
from cwac.utils import compose_config


def main(argv: list[str]) -> dict:
    cfg = compose_config("method=sppft", *argv)
    setup_env(cfg)
    store = ArtifactStore(cfg.paths.artifacts)
    path, _ = start_model(cfg, store)
    model, _, fmt = load_chat_model(path, cfg.model, hub_ok=not cfg.offline)
    res = located_band(store, path, model, fmt, cfg.method.locate)
    print(json.dumps({"model": cfg.model.name, "start_model": path, **res}, indent=1))
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
