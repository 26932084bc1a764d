"""Reimplemented harmful-fine-tuning defences. Importing this package registers every
method in ``cwac.methods.METHODS`` (the single import site); add a new baseline by
writing one module here, importing it below, and adding ``conf/method/<name>.yaml``.

Fine-tuning stage: ``asft``, ``safeinstr``, ``sppft``, ``lisa``; after fine-tuning: ``safelora``;
alignment stage: ``vaccine`` (``method@alignment.method=vaccine``). Shared pieces: ``_common``
(model plumbing), ``_weights`` (the alignment direction C of AsFT / SafeLoRA), ``_data``
(safety rows, alignment pool).
"""

from baselines import asft, lisa, safeinstr, safelora, sft, sppft, vaccine  # noqa: F401
