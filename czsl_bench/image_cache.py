"""Decoded-image cache: every image of a split decoded once into uint8 shards.

Methods that tune the image encoder (the three-path family) read images, not features, every
epoch. Decoding them with PIL in the training loop costs about a third of ClusPro's training on
the embedded world (docs/methods.md, "Input pipeline"). Here each split is decoded once:

* **What is stored**: the decoded originals, ``PIL.Image.open(f).convert(mode)`` as uint8
  ``H x W x C`` arrays, at their own resolution. Nothing is resized: today's transforms read the
  original pixel grid (RandomResizedCrop picks its box on it, both resizes sample it), so any
  smaller copy would change the tensors, and the run's numbers with them. With the originals, the
  batched transforms of :mod:`czsl_bench.image_transforms` give the PIL path's tensors bit for bit.
* **Layout**: ``<cache root>/images/<key[:2]>/<key>/shard-00000.u8 ...`` (raw bytes, images one
  after the other, up to :data:`SHARD_BYTES` per shard) and ``index.json`` (every image's shard,
  offset, height and width; every shard's size and sha256; the key parts). Entries up to
  :data:`IN_MEMORY_BYTES` are read into memory, larger ones are memory-mapped.
* **Key**: sha256 of the canonical JSON of the parts (:func:`split_parts`): the dataset's content
  version, the split, the image list (relative path and byte size of each file), the decode
  policy and the backbone's preprocessing, plus :data:`IMAGE_CACHE_FORMAT`. Any change is a new
  entry, never a stale hit.
* **Verified on read**: every shard's size (a truncated shard is caught without reading it) and
  sha256 (about 1 s per GB); a damaged entry is logged, deleted and decoded again.
* **Atomic**: shards are written through :mod:`czsl_bench.atomic` and ``index.json`` last; an entry
  exists only once its index does, so a killed build leaves no entry (its shards are removed by the
  next build of that key and by :meth:`ImageCache.clear`). A per-key ``flock`` makes concurrent
  processes decode once.

Without a cache root (``--cache-dir`` unset and no feature cache) the decoded split is only held
in memory for the run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from czsl_bench.cache import CacheEntry, default_cache_root
from czsl_bench.atomic import atomic_file, atomic_write_text, exclusive_lock
from czsl_bench.hashing import canonical_json, sha256_file

__all__ = ["DecodedImages", "IMAGE_CACHE_FORMAT", "ImageCache", "decode_split", "split_parts"]

log = logging.getLogger(__name__)

# Bump when the layout of entries or the meaning of a key part changes: old entries become misses.
IMAGE_CACHE_FORMAT = 1
KIND = "decoded_images"
SHARD_BYTES = 256 << 20
IN_MEMORY_BYTES = 512 << 20
INDEX = "index.json"
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# the decoded images of one split
# ---------------------------------------------------------------------------------------------
class DecodedImages:
    """``N`` decoded images, each a zero-copy ``H x W x C`` uint8 view into a shard.

    ``table[i] = (shard, offset, height, width)``. Shards are arrays in memory or memory-mapped
    files (copy-on-write: a view may be written to, the file never changes); a memory-mapped store
    pickles as its file paths, so DataLoader workers map the files again instead of copying them.
    """

    def __init__(self, shards: list[np.ndarray], table: np.ndarray, channels: int = 3,
                 paths: list[Path] | None = None):
        self.shards = shards
        self.table = np.asarray(table, dtype=np.int64).reshape(-1, 4)
        self.channels = channels
        self.paths = paths  # set when the shards are memory-mapped

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> DecodedImages:
        """An in-memory store of decoded ``H x W x C`` arrays (one shard)."""
        channels = int(arrays[0].shape[2]) if arrays else 3
        table, offset = [], 0
        for array in arrays:
            table.append((0, offset, array.shape[0], array.shape[1]))
            offset += array.nbytes
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0, dtype=np.uint8)
        return cls([flat], np.asarray(table, dtype=np.int64), channels)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))

    @property
    def sizes(self) -> np.ndarray:
        """``[N, 2]`` (height, width) of every image."""
        return self.table[:, 2:4]

    def array(self, index: int) -> np.ndarray:
        shard, offset, h, w = (int(v) for v in self.table[index])
        return self.shards[shard][offset:offset + h * w * self.channels].reshape(h, w, self.channels)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.paths is not None:
            state["shards"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.shards is None:
            self.shards = [np.memmap(p, dtype=np.uint8, mode="c") for p in self.paths]


def decode_split(root: Path, images: Sequence[str], mode: str = "RGB", progress: Progress | None = None,
                 sink: Callable[[np.ndarray], None] | None = None, workers: int | None = None) -> list[np.ndarray]:
    """Decode ``root/images[i]`` in order with PIL (``convert(mode)``), in DataLoader workers
    (:func:`czsl_bench.loading.loader_settings`); each array goes to ``sink`` (then nothing is
    kept) or into the returned list. A file that cannot be decoded raises one line naming it."""
    from czsl_bench.loading import loader_settings

    settings = loader_settings("cpu", workers, decodes=True, persistent=False, items=len(images), main_waits=True)
    loader = torch.utils.data.DataLoader(
        _DecodeFiles(Path(root), list(images), mode), batch_size=32, shuffle=False,
        collate_fn=_as_is, generator=torch.Generator(),  # the global RNG is never drawn from
        **settings.kwargs())
    kept: list[np.ndarray] = []
    done = 0
    for chunk in loader:
        for array in chunk:
            if sink is None:
                kept.append(array)
            else:
                sink(array)
        done += len(chunk)
        if progress is not None:
            progress(done, len(images))
    return kept


def _as_is(batch: Any) -> Any:
    return batch


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, root: Path, images: list[str], mode: str):
        self.root, self.images, self.mode = root, images, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        from czsl_bench.datasets.czsl_format import ImageDecodeError, PathEscapeError, decode_image, resolve_image_path

        try:
            path = resolve_image_path(self.root, self.images[index])
        except PathEscapeError as exc:
            raise ImageDecodeError(str(exc)) from None  # survives worker processes as one line
        image = decode_image(path)
        if self.mode != "RGB":
            image = image.convert(self.mode)
        array = np.asarray(image, dtype=np.uint8)
        return array if array.ndim == 3 else array[:, :, None]


# ---------------------------------------------------------------------------------------------
# keys and the on-disk cache
# ---------------------------------------------------------------------------------------------
def split_parts(split: Any, dataset_version: str, preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """The key parts of a split's decoded images (see the module docstring)."""
    from czsl_bench.features import image_list_hash

    return {
        "kind": KIND,
        "dataset_version": str(dataset_version),
        "split": str(getattr(split, "name", "?")),
        "images": image_list_hash(split.root, split.images, getattr(split, "image_path", None)),
        "n": len(split.images),
        # what is stored: the decoded originals in the preprocessing's colour mode
        "policy": {"decode": "PIL.convert", "mode": str(preprocess.get("mode", "RGB")), "resize": "none"},
        "preprocess": dict(preprocess),
    }


class ImageCache:
    """Content-addressed store of decoded splits under ``<root>/images`` (module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    @staticmethod
    def key(**parts: Any) -> str:
        doc = {"czsl_image_cache_format": IMAGE_CACHE_FORMAT, "parts": parts}
        return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"image cache key {key!r} is not a sha256 hex digest; build keys with ImageCache.key(...)")
        return self.images_dir / key[:2] / key

    # ---- read ----------------------------------------------------------------------------------
    def get(self, key: str, in_memory_bytes: int = IN_MEMORY_BYTES) -> DecodedImages | None:
        """The entry ``key`` after verifying it, or None. A damaged entry is logged and deleted."""
        folder = self.path(key)
        if not (folder / INDEX).is_file():
            return None
        try:
            return _open_entry(folder, key, in_memory_bytes)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("decoded-image cache entry %s is damaged (%s); deleting it and decoding again", key[:12], exc)
            self.remove(key)
            return None

    def get_or_build(self, parts: Mapping[str, Any], root: Path, images: Sequence[str],
                     progress: Progress | None = None, workers: int | None = None,
                     meta: Mapping[str, Any] | None = None) -> DecodedImages:
        """The entry for ``parts``; on a miss decode ``root/images`` into a new entry first."""
        key = self.key(**parts)
        hit = self.get(key)
        if hit is not None:
            return hit
        with exclusive_lock(self.path(key).with_suffix(".lock")):
            hit = self.get(key)  # another process may have built it while we waited
            if hit is not None:
                return hit
            self._build(key, parts, root, images, progress, workers, meta)
        hit = self.get(key)
        if hit is None:
            raise OSError(f"decoded-image cache entry {key[:12]} under {self.images_dir} failed its check right "
                          "after it was written; check the disk, or run without --cache-dir")
        return hit

    # ---- write ---------------------------------------------------------------------------------
    def _build(self, key: str, parts: Mapping[str, Any], root: Path, images: Sequence[str],
               progress: Progress | None, workers: int | None, meta: Mapping[str, Any] | None) -> None:
        folder = self.path(key)
        if folder.exists():  # the shards of a killed build (no index): never an entry, start over
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        writer = _ShardWriter(folder)
        try:
            decode_split(root, images, str(parts.get("policy", {}).get("mode", "RGB")), progress,
                         writer.add, workers)
            shards = writer.close()
            index = {
                "format": IMAGE_CACHE_FORMAT,
                "key": key,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "parts": dict(parts),
                "meta": dict(meta or {}),
                "channels": writer.channels,
                "shards": shards,
                "images": writer.table,
            }
            atomic_write_text(folder / INDEX, canonical_json(index))  # the commit point
        except BaseException:
            writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # ---- listing and removal -------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Complete entries, newest first (their indexes only; shards are not read)."""
        out: list[CacheEntry] = []
        if not self.images_dir.is_dir():
            return out
        for index_path in self.images_dir.glob(f"*/*/{INDEX}"):
            folder = index_path.parent
            try:
                doc = json.loads(index_path.read_text(encoding="utf-8"))
                parts, meta, created = doc.get("parts", {}), doc.get("meta", {}), doc.get("created", "?")
            except (OSError, ValueError):  # list damaged entries too, so that clear can remove them
                parts, meta, created = {}, {"error": "unreadable"}, "?"
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out.append(CacheEntry(key=folder.name, path=folder, kind=KIND, size_bytes=size, created=created,
                                  parts=parts, meta={**meta, "split": parts.get("split", meta.get("split", "?")),
                                                     "n": parts.get("n", "?")}))
        out.sort(key=lambda e: e.created, reverse=True)
        return out

    def remove(self, key: str) -> bool:
        folder = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            folder.with_suffix(".lock").unlink()
        if not folder.exists():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def clear(self) -> int:
        """Delete every entry, the shards of killed builds and stale lock files; returns the entry count."""
        removed = sum(self.remove(e.key) for e in self.entries())
        if self.images_dir.is_dir():
            for leftover in self.images_dir.glob("*/*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
        return removed


class _ShardWriter:
    """Appends images to ``shard-NNNNN.u8`` files (atomic, sha256 while writing)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.table: list[list[int]] = []
        self.channels: int | None = None
        self._shards: list[dict[str, Any]] = []
        self._ctx = None
        self._handle = None
        self._digest = None
        self._size = 0

    def add(self, array: np.ndarray) -> None:
        if self.channels is None:
            self.channels = int(array.shape[2])
        if self._handle is None or self._size + array.nbytes > SHARD_BYTES and self._size > 0:
            self._next()
        self.table.append([len(self._shards) - 1, self._size, int(array.shape[0]), int(array.shape[1])])
        data = np.ascontiguousarray(array).data
        self._handle.write(data)
        self._digest.update(data)
        self._size += array.nbytes

    def _next(self) -> None:
        self._finish()
        name = f"shard-{len(self._shards):05d}.u8"
        self._ctx = atomic_file(self.folder / name, "wb")
        self._handle = self._ctx.__enter__()
        self._digest = hashlib.sha256()
        self._size = 0
        self._shards.append({"file": name, "bytes": 0, "sha256": ""})

    def _finish(self) -> None:
        if self._ctx is None:
            return
        self._ctx.__exit__(None, None, None)
        self._shards[-1].update(bytes=self._size, sha256=self._digest.hexdigest())
        self._ctx = self._handle = None

    def close(self) -> list[dict[str, Any]]:
        if not self._shards:  # an empty split still gets an (empty) shard: one code path on read
            self._next()
        self._finish()
        if self.channels is None:
            self.channels = 3
        return self._shards

    def abort(self) -> None:
        if self._ctx is not None:
            import sys

            with contextlib.suppress(BaseException):
                self._ctx.__exit__(*sys.exc_info())
            self._ctx = None


def _open_entry(folder: Path, key: str, in_memory_bytes: int) -> DecodedImages:
    doc = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    if doc.get("format") != IMAGE_CACHE_FORMAT:
        raise ValueError(f"format {doc.get('format')!r}, expected {IMAGE_CACHE_FORMAT}")
    if doc.get("key") != key:
        raise ValueError("index names another key")
    channels = int(doc["channels"])
    table = np.asarray(doc["images"], dtype=np.int64).reshape(-1, 4)
    shards_doc = doc["shards"]
    total = sum(int(s["bytes"]) for s in shards_doc)
    paths = [folder / str(s["file"]) for s in shards_doc]
    for path, spec in zip(paths, shards_doc):
        size = path.stat().st_size
        if size != int(spec["bytes"]):
            raise ValueError(f"{path.name} holds {size:,} of {int(spec['bytes']):,} bytes (truncated)")
    if len(table):
        ends = table[:, 1] + table[:, 2] * table[:, 3] * channels
        sizes = np.asarray([int(s["bytes"]) for s in shards_doc], dtype=np.int64)
        if table[:, 0].min() < 0 or table[:, 0].max() >= len(paths) or (ends > sizes[table[:, 0]]).any():
            raise ValueError("the index points past its shards")
    if total <= in_memory_bytes:
        shards = []
        for path, spec in zip(paths, shards_doc):
            data = np.fromfile(path, dtype=np.uint8)
            if hashlib.sha256(data.data).hexdigest() != spec["sha256"]:
                raise ValueError(f"{path.name}: checksum mismatch")
            shards.append(data)
        return DecodedImages(shards, table, channels)
    for path, spec in zip(paths, shards_doc):
        if sha256_file(path) != spec["sha256"]:
            raise ValueError(f"{path.name}: checksum mismatch")
    return DecodedImages([np.memmap(p, dtype=np.uint8, mode="c") for p in paths], table, channels, paths)
