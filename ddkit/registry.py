"""One small registry class (after timm, without import side effects on other modules).

Variants are registered as partials (``convnet_d4 = partial(convnet, depth=4)``), never parsed from names.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to factories; unknown names raise with close matches."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; used bare as a decorator it takes the object's ``__name__``."""

        def add(target: T) -> T:
            key = (name or getattr(target, "__name__")).lower()
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = target
            return target

        if obj is not None:
            return add(obj)
        return add

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._entries:
            close = difflib.get_close_matches(key, self._entries.keys(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (available: {', '.join(self.names())})"
            )
        return self._entries[key]

    def create(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} is not callable")
        return factory(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MODELS: Registry[Callable[..., Any]] = Registry("model")
METHODS: Registry[Any] = Registry("method")
DATASETS: Registry[Any] = Registry("dataset")
