"""Content-hashed on-disk cache for frozen features (image features, pair text banks).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from czsl_bench.atomic import atomic_path
from czsl_bench.hashing import sha256_lines, tensors_sha256
from czsl_bench.names import clean_name

if TYPE_CHECKING:
    from czsl_bench.backbone import Backbone

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheEntry",
    "FeatureCache",
    "default_cache_root",
    "encode_images",
    "encode_texts",
    "encode_token_ids",
    "image_features",
    "pair_prompts",
    "pair_text_features",
    "split_image_features",
    "tokenize_prompts",
]

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
        with self._lock(key):
            hit = self.get(key)  # another process may have finished while we waited
            if hit is not None:
                return hit
            tensors = dict(compute())
            self.put(key, tensors, meta=meta, parts=parts)
        return {k: v.detach().to("cpu") for k, v in tensors.items()}

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic replace alone keeps entries whole
            yield
            return
        lock_path = self.path(key).with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

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


# --------------------------------------------------------------------------------------------
# the common uses: image features of a split, text features of pair prompts


def pair_prompts(
    pairs: Sequence[tuple[str, str]], template: str = "a photo of {attr} {obj}", clean: Callable[[str], str] = clean_name
) -> list[str]:
    """One prompt per (attribute, object) pair."""
    if "{attr}" not in template or "{obj}" not in template:
        raise ValueError(f"prompt template {template!r} must contain {{attr}} and {{obj}}")
    return [template.format(attr=clean(a), obj=clean(o)) for a, o in pairs]


def _backbone_parts(backbone: Backbone) -> dict:
    return {"arch": backbone.arch, "weights": backbone.weights_hash, "precision": backbone.precision}


def tokenize_prompts(backbone: Backbone, texts: Sequence[str], context_length: int | None = None) -> Tensor:
    """Token ids ``[P, L]`` of all prompts (CPU).

    ``context_length=None`` trims to the shortest context that holds every prompt whole: CLIP's
    text transformer is causal and read at EOT, so the features equal the 77-token ones up to
    float noise, several times faster. An explicit context length truncates longer prompts to
    ``SOT ... EOT`` as the CSP/Troika repos do.
    """
    chunks = [
        backbone.tokenize(list(texts[start : start + 8192]), context_length).cpu()
        for start in range(0, len(texts), 8192)
    ]
    if not chunks:
        return torch.empty(0, context_length or 2, dtype=torch.long)
    ids = torch.cat(chunks)
    if context_length is None:
        ids = ids[:, : int(backbone.eot_index(ids).max()) + 1].contiguous()
    return ids


def encode_token_ids(
    backbone: Backbone, ids: Tensor, batch_size: int = 1024, progress: Progress | None = None
) -> Tensor:
    """Frozen text features ``[P, D]`` (float32, CPU, not normalised) of token ids, in batches."""
    out = torch.empty(len(ids), backbone.embed_dim)
    with torch.inference_mode(), backbone.autocast():
        for start in range(0, len(ids), batch_size):
            stop = min(len(ids), start + batch_size)
            chunk = ids[start:stop].to(backbone.device)
            feats = backbone.encode_text_embeddings(backbone.token_embedding(chunk), backbone.eot_index(chunk))
            out[start:stop] = feats.float().cpu()
            if progress is not None:
                progress(stop, len(ids))
    return out


def cached_text_features(backbone: Backbone, cache: FeatureCache | None, texts: Sequence[str],
                         batch_size: int = 1024) -> Tensor:
    """Frozen text features ``[len(texts), D]`` (float32, CPU, not normalised) of plain sentences,
    read from ``cache`` when given (keyed by backbone, context length and the texts' hash).

    The description banks of LaZSL and PLID go through here: a bank is encoded once per backbone."""
    ids = tokenize_prompts(backbone, texts)

    def compute() -> dict[str, Tensor]:
        return {"features": encode_token_ids(backbone, ids, batch_size)}

    if cache is None:
        return compute()["features"].float()
    parts = {"kind": "text_features", "arch": backbone.arch, "weights": backbone.weights_hash,
             "precision": backbone.precision, "context_length": int(ids.shape[1]),
             "texts": sha256_lines(texts), "n": len(texts)}
    meta = {"arch": backbone.arch, "n": len(texts), "first": texts[0] if texts else ""}
    return cache.get_or_compute(parts, compute, meta=meta)["features"].float()


def encode_texts(
    backbone: Backbone,
    texts: Sequence[str],
    context_length: int | None = None,
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> Tensor:
    """Frozen text features ``[P, D]`` of plain strings (see :func:`tokenize_prompts`)."""
    return encode_token_ids(backbone, tokenize_prompts(backbone, texts, context_length), batch_size, progress)


def pair_text_features(
    backbone: Backbone,
    pairs: Sequence[tuple[str, str]],
    template: str = "a photo of {attr} {obj}",
    context_length: int | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 1024,
    progress: Progress | None = None,
    clean: Callable[[str], str] = clean_name,
) -> Tensor:
    """Frozen CLIP text features ``[P, D]`` of ``template`` for every pair, cached.

    Key: arch, weights hash, precision, template, effective context length and a hash of the
    final prompt strings (which covers the pair list and the name cleaning). Open-world C-GQA
    (278,362 prompts) is encoded once in batches of ``batch_size``. ``progress(done, total)``
    is called after each batch of a miss.
    """
    prompts = pair_prompts(pairs, template, clean)
    # Tokenise first: the key names the context length actually used ("shortest that fits").
    ids = tokenize_prompts(backbone, prompts, context_length)
    context_length = ids.shape[1]
    parts = {
        "kind": "pair_text_features",
        **_backbone_parts(backbone),
        "template": template,
        "context_length": int(context_length),
        "prompts": sha256_lines(prompts),
        "n": len(prompts),
    }

    def compute() -> dict[str, Tensor]:
        return {"features": encode_token_ids(backbone, ids, batch_size, progress)}

    if cache is None:
        return compute()["features"]
    meta = {"arch": backbone.arch, "template": template, "n": len(prompts), "first": prompts[0] if prompts else ""}
    return cache.get_or_compute(parts, compute, meta=meta)["features"]


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, root: Path, images: Sequence[str], transform: Callable):
        self.root, self.images, self.transform = Path(root), list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.images[i]
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(path)!r} is missing; check the dataset root") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise OSError(f"image {str(path)!r} cannot be read ({exc.__class__.__name__}); re-download it") from None


def encode_images(
    backbone: Backbone,
    root: str | os.PathLike,
    images: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> Tensor:
    """Frozen class-token features ``[N, D]`` (float32, CPU) of image files with eval preprocessing.

    Adapters, if any, are ignored: these are the features of the frozen CLIP image encoder.
    """
    loader = torch.utils.data.DataLoader(
        _ImageFiles(Path(root), images, backbone.preprocess_eval),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=backbone.device.type == "cuda",
    )
    out = torch.empty(len(images), backbone.embed_dim)
    done = 0
    with torch.inference_mode(), backbone.autocast():
        for batch in loader:
            feats = backbone.encode_image(batch.to(backbone.device, non_blocking=True), adapters=False)
            out[done : done + len(batch)] = feats.float().cpu()
            done += len(batch)
            if progress is not None:
                progress(done, len(images))
    return out


def image_list_hash(root: str | os.PathLike, images: Sequence[str]) -> str:
    """Hash of the relative paths and byte sizes of the images (a cheap content proxy).

    The dataset root itself is not part of it, so moving a dataset keeps its cache entries.
    """
    root = Path(root)
    lines = []
    for rel in images:
        try:
            size = (root / rel).stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(root / rel)!r} is missing; check the dataset root") from None
        lines.append(f"{rel}\t{size}")
    return sha256_lines(lines)


def image_features(
    backbone: Backbone,
    root: str | os.PathLike,
    images: Sequence[str],
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Progress | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Tensor:
    """Frozen image features ``[N, D]`` of ``root/images[i]``, cached.

    Key: arch, weights hash, precision, eval preprocessing, the image list hash (relative paths
    and byte sizes) and ``extra`` (e.g. hashes of the split files).
    """
    parts = {
        "kind": "image_features",
        **_backbone_parts(backbone),
        "preprocess": backbone.describe_preprocess(),
        "images": image_list_hash(root, images),
        "n": len(images),
        "extra": dict(extra or {}),
    }

    def compute() -> dict[str, Tensor]:
        return {"features": encode_images(backbone, root, images, batch_size, num_workers, progress)}

    if cache is None:
        return compute()["features"]
    meta = {"arch": backbone.arch, "root": Path(root).name, "n": len(images)}
    meta.update({k: v for k, v in (extra or {}).items() if isinstance(v, (str, int))})
    return cache.get_or_compute(parts, compute, meta=meta)["features"]


def split_image_features(
    backbone: Backbone,
    split: Any,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Progress | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Tensor:
    """:func:`image_features` of a dataset :class:`~czsl_bench.datasets.Split` (``root``, ``images``)."""
    more = {"split": getattr(split, "name", "?"), **dict(extra or {})}
    return image_features(backbone, split.root, split.images, cache, batch_size, num_workers, progress, more)
