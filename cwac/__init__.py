"""cwac-repro: shared machinery (data, models, training loop, Method interface,
artifacts, result records) and the CWAC method itself.

Reproduces *Preventing Safety Drift in Large Language Models via Coupled Weight and
Activation Constraints* (Peng et al., Findings of ACL 2026, arXiv 2604.12384).
"""

__version__ = "0.1.0"
