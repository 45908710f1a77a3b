"""Content-hashed on-disk cache for frozen features (image features, pair text banks): storage only.

What goes in (encoding images and prompts with the backbone, and their keys) is
``czsl_bench/features.py``.

An entry is one safetensors file whose name is the sha256 of a canonical JSON of everything that
changes its content (architecture, weights hash, preprocessing, image list, prompts, context
length, ...) plus :data:`CACHE_FORMAT_VERSION`. Change any part and the key changes: a miss, never
a stale hit.

* Root: ``$CZSL_CACHE`` if set, else ``$XDG_CACHE_HOME/czsl-bench``, else ``~/.cache/czsl-bench``.
  Entries live in ``<root>/features/<key[:2]>/<key>.safetensors``.
* Writes go to a temporary file in the same directory and are ``os.replace``'d into place, so a
  reader sees either no file or a whole one, and concurrent writers of the same key simply replace
  one complete file with an identical one. :meth:`FeatureCache.get_or_compute` also holds an
  advisory ``flock`` per key (POSIX) so that concurrent processes compute an entry once.
* Every entry stores a sha256 of its tensors in the safetensors header. A file that is truncated
  (safetensors' own length check) or whose tensors do not match the checksum is reported, deleted
  and recomputed, never read.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from czsl_bench.atomic import atomic_path, exclusive_lock
from czsl_bench.hashing import tensors_sha256

__all__ = ["CACHE_FORMAT_VERSION", "CacheEntry", "FeatureCache", "Progress", "default_cache_root"]

log = logging.getLogger(__name__)

# Bump when the layout of entries or the meaning of a key part changes: old entries become misses.
CACHE_FORMAT_VERSION = 1
_SUFFIX = ".safetensors"
Progress = Callable[[int, int], None]


def default_cache_root() -> Path:
    """``$CZSL_CACHE``, else ``$XDG_CACHE_HOME/czsl-bench``, else ``~/.cache/czsl-bench``."""
    if os.environ.get("CZSL_CACHE"):
        return Path(os.environ["CZSL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "czsl-bench"


def _canonical(value: Any, where: str = "parts") -> Any:
    """JSON-ready copy of ``value``; rejects types whose text form would not be stable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # json writes floats with repr: exact round-trip, and 1 != 1.0 != "1.0"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    raise TypeError(
        f"cache key part {where} is a {type(value).__name__}; use str, int, float, bool, None, lists or dicts "
        "(hash large inputs with czsl_bench.hashing.sha256_lines first)"
    )


@dataclass(frozen=True)
class CacheEntry:
    """One file in the cache, as ``czsl-bench cache ls`` shows it."""

    key: str
    path: Path
    kind: str
    size_bytes: int
    created: str
    parts: dict
    meta: dict


class FeatureCache:
    """Content-addressed tensor cache (see the module docstring for the guarantees)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    # ---- keys and paths --------------------------------------------------------------------
    @staticmethod
    def key(**parts: Any) -> str:
        """sha256 of the canonical JSON of ``parts`` and the cache format version."""
        doc = {"czsl_cache_format": CACHE_FORMAT_VERSION, "parts": _canonical(parts)}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key {key!r} is not a sha256 hex digest; build keys with FeatureCache.key(...)")
        return self.features_dir / key[:2] / f"{key}{_SUFFIX}"

    # ---- read ------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Tensor] | None:
        """The tensors stored under ``key``, or ``None`` on a miss.

        A truncated or corrupted file is logged, deleted and reported as a miss.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path), device="cpu")
            if header.get("czsl_cache_format") != str(CACHE_FORMAT_VERSION):
                raise ValueError(f"format {header.get('czsl_cache_format')!r}")
            if header.get("sha256") != tensors_sha256(tensors):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt, not read
            log.warning("cache entry %s is unreadable (%s); deleting it and recomputing", path.name, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return tensors

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    # ---- write -----------------------------------------------------------------------------
    def put(
        self,
        key: str,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, Any] | None = None,
        parts: Mapping[str, Any] | None = None,
    ) -> Path:
        """Store ``tensors`` under ``key`` atomically; ``meta``/``parts`` are kept for ``cache ls``."""
        from safetensors.torch import save_file

        if not tensors:
            raise ValueError("refusing to cache an empty tensor dict")
        ready: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()  # safetensors refuses tensors that share memory
            if t.numel():
                seen.add(t.untyped_storage().data_ptr())
            ready[str(name)] = t
        header = {
            "czsl_cache_format": str(CACHE_FORMAT_VERSION),
            "key": key,
            "sha256": tensors_sha256(ready),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parts": json.dumps(_canonical(dict(parts or {})), sort_keys=True),
            "meta": json.dumps(_canonical(dict(meta or {})), sort_keys=True),
        }
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file(ready, str(tmp), metadata=header)
        return path

    def get_or_compute(
        self,
        parts: Mapping[str, Any],
        compute: Callable[[], Mapping[str, Tensor]],
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Return the entry for ``parts``; on a miss call ``compute()``, store and return it.

        Concurrent processes asking for the same parts wait on a per-key lock, so only one computes.
        """
        key = self.key(**parts)
        hit = self.get(key)
        if hit is not None:
            return hit
        with exclusive_lock(self.path(key).with_suffix(".lock")):
            hit = self.get(key)  # another process may have finished while we waited
            if hit is not None:
                return hit
            tensors = dict(compute())
            self.put(key, tensors, meta=meta, parts=parts)
        return {k: v.detach().to("cpu") for k, v in tensors.items()}

    # ---- listing and removal ---------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """All entries, newest first (headers only; tensors are not read)."""
        from safetensors import safe_open

        out: list[CacheEntry] = []
        if not self.features_dir.is_dir():
            return out
        for path in self.features_dir.glob(f"*/*{_SUFFIX}"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    header = f.metadata() or {}
                parts = json.loads(header.get("parts", "{}"))
                meta = json.loads(header.get("meta", "{}"))
            except Exception:  # noqa: BLE001 - list damaged files too, so that clear can remove them
                header, parts, meta = {"created": "?"}, {}, {"error": "unreadable"}
            out.append(
                CacheEntry(
                    key=path.name.removesuffix(_SUFFIX),
                    path=path,
                    kind=str(parts.get("kind", "?")),
                    size_bytes=path.stat().st_size,
                    created=header.get("created", "?"),
                    parts=parts,
                    meta=meta,
                )
            )
        out.sort(key=lambda e: e.created, reverse=True)
        return out

    def remove(self, key: str) -> bool:
        """Delete one entry; ``True`` if it existed."""
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".lock").unlink()
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def clear(self, kind: str | None = None) -> int:
        """Delete every entry (or those of one ``kind``) plus stale temp and lock files; returns the count."""
        removed = 0
        for entry in self.entries():
            if kind is None or entry.kind == kind:
                removed += self.remove(entry.key)
        if kind is None and self.features_dir.is_dir():
            for leftover in list(self.features_dir.glob("*/*.tmp")) + list(self.features_dir.glob("*/*.lock")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        return removed
