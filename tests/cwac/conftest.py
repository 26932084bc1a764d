"""Fixtures shared by the CWAC method tests: small offline sizes and one torch thread."""

from __future__ import annotations

import pytest
import torch

#: overrides that make CWAC's offline pieces (pool, subspace, SAE, latents) seconds-long on the tiny model
SMALL = ["method.prompts.n_train=40", "method.prompts.n_heldout=6", "method.prompts.n_calibration=16",
         "method.prompts.filter_refused=false", "method.sae.corpus.tokens=3000", "method.sae.train.steps=80",
         "method.sae.train.batch_size=128", "method.activation.selection.n_harmless=32", "method.activation.layer=0",
         "method.activation.n_latents=40", "training.max_steps=3", "harmful.n_total=12"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
