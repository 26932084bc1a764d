"""Reimplemented harmful-fine-tuning defences. Importing this package registers every
method in ``cwac.methods.METHODS`` (the single import site); add a new baseline by
writing one module here, importing it below, and adding ``conf/method/<name>.yaml``."""

from baselines import sft  # noqa: F401
