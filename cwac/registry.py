"""A small typed registry: name -> class, with a base-class check and a helpful miss.

Idea borrowed from lm-evaluation-harness' ``lm_eval/api/registry.py`` (typed registry,
"valid names" error); kept to what this project needs.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if self.base is not None and not issubclass(cls, self.base):
                raise TypeError(f"{cls.__name__} must subclass {self.base.__name__} to be a {self.kind}")
            old = self._items.get(name)
            rerun = old is not None and "__main__" in (old.__module__, cls.__module__) and old.__qualname__ == cls.__qualname__
            if old is not None and old is not cls and not rerun:  # (rerun: a module run with python -m)
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._items[name].__name__}")
            self._items[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
