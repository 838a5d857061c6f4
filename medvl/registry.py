"""Exact-name registries.

Following open_clip's ``model_configs/`` practice (and avoiding TinyLLaVA's substring
matching), a registry maps an exact, case-sensitive name to one object. Registering a
name twice raises; asking for an unknown name raises :class:`MedvlUserError` listing the
names that exist and the closest match, so a typo gets a useful answer.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from medvl.errors import MedvlUserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of components; ``kind`` names what it holds in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is None."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MedvlUserError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
