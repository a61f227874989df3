"""One registry per closed list (attention backends, solvers, presets, memory modes, decode orders, ...).

Every front end derives its choices from a registry: the CLI's ``choices``, the ComfyUI node combos,
doctor's rows and the JS mirror test. Registering an entry in one place makes it appear everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping from name to entry, whose lookups fail with a message that lists the choices."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "attention backend": used in error messages
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a temporary one)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"{self.what} {name!r}: choose one of {self.choices_text()}") from None

    def choices_text(self) -> str:
        """The names, each with its description when the entries are descriptions (plain strings)."""
        return ", ".join(f"{name} ({entry})" if isinstance(entry, str) else name
                         for name, entry in self._entries.items())

    def check(self, name: str) -> str:
        """``name`` if registered, else ConfigError listing the choices."""
        self.get(name)
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
