"""Reimplemented harmful-fine-tuning defences, one module each, built on ``cwac.api.Method``.

Fine-tuning stage: ``asft``, ``safeinstr``, ``sppft``, ``lisa``; after fine-tuning: ``safelora``;
alignment stage: ``vaccine`` (``method@alignment.method=vaccine``); ``sft`` is the undefended
reference. Each is registered by name in ``cwac/experiment/plugins.py`` (the one registration
site) and configured by ``conf/method/<name>.yaml``. Shared pieces: ``_common`` (checkpoint
access, target maps), ``_weights`` (the alignment direction C of AsFT / SafeLoRA), ``_data``
(safety rows, alignment pool).
"""
