"""Orchestration: the only layer that knows both the methods and the evaluators.

* ``plugins``: the one registration site of every method and judge;
* ``align``: the start model of a cell (building the aligned organism once, when it is missing);
* ``cell``: one experiment cell, end to end, and its record;
* ``locate_sppft``: SPPFT's safety-layer locator as a command.
"""
