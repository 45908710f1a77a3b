"""Frozen features of a backbone: image features of a split and text features of pair prompts.

What to encode and under which key; storing the result is ``czsl_bench/cache.py``'s job. Image
files of a dataset split are opened through the split's own :meth:`image_path`, so the dataset
root guard (docs/datasets.md) applies here exactly as in training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from czsl_bench.cache import FeatureCache, Progress
from czsl_bench.hashing import sha256_lines
from czsl_bench.names import clean_name

if TYPE_CHECKING:
    from czsl_bench.backbone import Backbone

__all__ = [
    "cached_text_features",
    "encode_images",
    "encode_texts",
    "encode_token_ids",
    "image_features",
    "image_list_hash",
    "pair_prompts",
    "pair_text_features",
    "split_image_features",
    "tokenize_prompts",
]


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


PathOf = Callable[[int], Path]


def _paths_under(root: str | os.PathLike, images: Sequence[str]) -> PathOf:
    root = Path(root)
    return lambda i: root / images[i]


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, path_of: PathOf, n: int, transform: Callable):
        self.path_of, self.n, self.transform = path_of, n, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.path_of(i)
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
    path_of: PathOf | None = None,
) -> Tensor:
    """Frozen class-token features ``[N, D]`` (float32, CPU) of image files with eval preprocessing.

    Adapters, if any, are ignored: these are the features of the frozen CLIP image encoder.
    ``path_of(i)`` locates image ``i`` (a split's guarded :meth:`image_path`); default ``root/images[i]``.
    """
    loader = torch.utils.data.DataLoader(
        _ImageFiles(path_of or _paths_under(root, images), len(images), backbone.preprocess_eval),
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


def image_list_hash(root: str | os.PathLike, images: Sequence[str], path_of: PathOf | None = None) -> str:
    """Hash of the relative paths and byte sizes of the images (a cheap content proxy).

    The dataset root itself is not part of it, so moving a dataset keeps its cache entries.
    """
    path_of = path_of or _paths_under(root, images)
    lines = []
    for i, rel in enumerate(images):
        path = path_of(i)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(path)!r} is missing; check the dataset root") from None
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
    path_of: PathOf | None = None,
) -> Tensor:
    """Frozen image features ``[N, D]`` of ``root/images[i]`` (or ``path_of(i)``), cached.

    Key: arch, weights hash, precision, eval preprocessing, the image list hash (relative paths
    and byte sizes) and ``extra`` (e.g. hashes of the split files).
    """
    parts = {
        "kind": "image_features",
        **_backbone_parts(backbone),
        "preprocess": backbone.describe_preprocess(),
        "images": image_list_hash(root, images, path_of),
        "n": len(images),
        "extra": dict(extra or {}),
    }

    def compute() -> dict[str, Tensor]:
        return {"features": encode_images(backbone, root, images, batch_size, num_workers, progress, path_of)}

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
    """:func:`image_features` of a dataset :class:`~czsl_bench.datasets.Split` (``root``, ``images``).

    Images are located by the split's :meth:`image_path` where it has one (the dataset root
    guard: a path that leaves the root is refused, not read)."""
    more = {"split": getattr(split, "name", "?"), **dict(extra or {})}
    path_of = getattr(split, "image_path", None)
    return image_features(backbone, split.root, split.images, cache, batch_size, num_workers, progress, more,
                          path_of)
