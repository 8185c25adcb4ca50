"""One registry helper for every kind of named plug-in: attacks, defenses, architectures,
datasets and job kinds.

Built-ins register through the same call a third party would use, so there is one path
from a name in a suite to the thing it names, and one place that turns a bad name or
bad parameters into a message that says what is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.hyperparams import keyword_params

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to entries (classes, builders, records) of one kind: ``what`` names it."""

    def __init__(self, what: str, *, plural: str | None = None):
        self.what = what
        self.plural = plural or f"{what}s"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; registering the same entry again is a no-op."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise GauntletError(
                f"Expected a {self.what} name to be a non-empty string, got {name!r}"
            )
        if name in self._entries and self._entries[name] is not entry:
            raise GauntletError(
                f"A {self.what} named {name!r} is already registered; pick another name"
            )
        self._entries[name] = entry
        return entry

    def register(self, entry: T) -> T:
        """Class decorator: register ``entry`` under its ``name`` attribute."""
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{entry!r} needs a non-empty attribute `name`")
        return self.add(name, entry)

    def named(self, name: str) -> Callable[[T], T]:
        """Decorator with an explicit name: ``@registry.named("small-cnn")``."""
        return lambda entry: self.add(name, entry)

    def known(self) -> str:
        return ", ".join(sorted(self._entries))

    def get(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise GauntletError(
                f"Unknown {self.what} {name!r}; known {self.plural}: {self.known()}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())


def configure(
    registry: Registry[type], name: str, params: Mapping[str, Any] | None, *args: Any
) -> Any:
    """``registry.get(name)(*args, **params)``, refusing parameters the class does not take.

    Constructors check their own values and raise ``GauntletError``.
    """
    cls = registry.get(name)
    params = dict(params or {})
    allowed = keyword_params(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise GauntletError(
            f"Unknown parameter(s) {', '.join(unknown)} for {registry.what} {name!r}; "
            f"accepted parameters: {', '.join(allowed) or 'none'}"
        )
    return cls(*args, **params)
