"""Name -> plugin registries for methods and datasets.

Plugins arrive two ways, both lazy: entry points in the groups ``czsl_bench.methods`` and
``czsl_bench.datasets`` (the built-ins are declared exactly like a third-party plugin, in
pyproject.toml), and the ``register`` decorator for in-process use (tests, notebooks).
Nothing is imported until a plugin is asked for by name, so ``czsl-bench --help`` never imports
torch. A name claimed twice is an error; a plugin that fails to import is reported and skipped,
never allowed to break the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(LookupError):
    """A plugin name is unknown, claimed twice, or its plugin failed to import."""


@dataclass
class _Entry:
    name: str
    origin: str  # "module:attr" for entry points, the qualified name for decorated objects
    loader: Callable[[], Any]
    obj: Any = None
    error: str | None = None
    loaded: bool = False
    from_entry_point: bool = False


@dataclass
class Registry(Generic[T]):
    kind: str  # "method" or "dataset": used in messages
    group: str  # entry-point group
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _discovered: bool = False
    # Names whose entry point is being imported right now, and what their modules registered
    # with the decorator meanwhile (a plugin module may do both; that is not a clash).
    _loading: dict[str, list[Any]] = field(default_factory=dict)

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("my-method")`` (name defaults to ``obj.name``)."""

        def decorate(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not key:
                raise RegistryError(f"cannot register {obj!r} as a {self.kind}: give it a name")
            origin = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
            self._add(_Entry(key, origin, lambda: obj, obj=obj, loaded=True))
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _add(self, entry: _Entry) -> None:
        self._discover()
        old = self._entries.get(entry.name)
        if old is not None and entry.name in self._loading and old.from_entry_point:
            self._loading[entry.name].append(entry.obj)  # checked once the entry point has loaded
            return
        if (old is not None and old.from_entry_point and not old.loaded
                and old.origin.split(":")[0] == entry.origin.split(":")[0]):
            # The entry point's module was imported directly and registered itself: same plugin.
            self._entries[entry.name] = dataclasses.replace(entry, from_entry_point=True)
            return
        if old is not None and old.origin != entry.origin:
            raise RegistryError(
                f"{self.kind} name {entry.name!r} is claimed twice: by {old.origin} and by "
                f"{entry.origin}; rename one of them"
            )
        self._entries[entry.name] = entry

    # -- discovery ----------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        seen: dict[str, str] = {}
        for ep in metadata.entry_points(group=self.group):
            origin = ep.value
            if ep.name in seen and seen[ep.name] != origin:
                # Two distributions claim one name: refuse both rather than pick silently.
                self._entries[ep.name] = _Entry(
                    ep.name, origin, lambda: None, loaded=True,
                    error=f"name claimed twice by entry points {seen[ep.name]} and {origin}; "
                    "uninstall or rename one",
                    from_entry_point=True,
                )
                continue
            seen[ep.name] = origin
            self._entries[ep.name] = _Entry(ep.name, origin, ep.load, from_entry_point=True)

    def refresh(self) -> None:
        """Re-read entry points (after installing a plugin at run time); decorated ones stay."""
        decorated = {k: e for k, e in self._entries.items() if not e.from_entry_point}
        self._entries = {}
        self._discovered = False
        self._discover()
        for entry in decorated.values():
            self._add(entry)

    # -- lookup -------------------------------------------------------------------------------
    def _load(self, entry: _Entry) -> None:
        if entry.loaded:
            return
        entry.loaded = True
        self._loading[entry.name] = []
        try:
            entry.obj = entry.loader()
            for other in self._loading[entry.name]:
                if other is not entry.obj:
                    raise RegistryError(
                        f"its module also registers a different object under {entry.name!r} with the "
                        "decorator; register one object per name"
                    )
        except Exception as exc:  # any import-time failure of a plugin must stay isolated
            entry.error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"{self.kind} plugin {entry.name!r} ({entry.origin}) failed to import: {entry.error}",
                stacklevel=3,
            )
        finally:
            del self._loading[entry.name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._discover()
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names()) or 'none'} "
                f"(`czsl-bench list {self.kind}s`)"
            )
        self._load(entry)
        if entry.error is not None:
            raise RegistryError(f"{self.kind} {name!r} ({entry.origin}) is broken: {entry.error}")
        return entry.obj

    def status(self) -> list[tuple[str, str, str | None]]:
        """(name, origin, error or None) for every plugin, importing each one."""
        self._discover()
        out = []
        for name in self.names():
            entry = self._entries[name]
            self._load(entry)
            out.append((name, entry.origin, entry.error))
        return out


METHODS: Registry[Any] = Registry("method", "czsl_bench.methods")
DATASETS: Registry[Any] = Registry("dataset", "czsl_bench.datasets")

register_method = METHODS.register
register_dataset = DATASETS.register
