"""A small typed registry: name -> class, with a base-class check and a helpful miss.

Entries are lazy ``"module:attr"`` strings, imported on first lookup, so the registry (a leaf)
never imports what it registers and the library never imports the defences and evaluators
built on it. Every entry is written in one place, ``cwac/experiment/plugins.py``. Ideas
borrowed from lm-evaluation-harness' ``lm_eval/api/registry.py`` (typed registry, lazy string
entries, "valid names" error) and SAELens' ``sae_lens/registry.py`` (a leaf registry).
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._items: dict[str, type[T]] = {}
        self._lazy: dict[str, str] = {}   # name -> "module:attr", imported on first get()

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``"package.module:Class"``; the module is imported on first lookup."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attr', got {target!r}")
        old = self._lazy.get(name)
        if old is not None and old != target:
            raise KeyError(f"{self.kind} {name!r} is already registered as {old}")
        self._lazy[name] = target

    def get(self, name: str) -> type[T]:
        if name in self._items:
            return self._items[name]
        if name not in self._lazy:
            raise KeyError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        module, attr = self._lazy[name].split(":", 1)
        cls = getattr(importlib.import_module(module), attr)
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self._lazy[name]} must be a subclass of {self.base.__name__} to be a {self.kind}")
        self._items[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._lazy
