"""Training and evaluation images for methods that read pixels: decoded once, transformed per batch.

:func:`train_images` and :func:`eval_batches` are what ``RunContext.train_images`` /
``RunContext.eval_batches`` call (czsl_bench/method.py). They read a split from the decoded-image
cache (czsl_bench/image_cache.py) and apply the backbone's transforms to whole uint8 batches on
the run's device (czsl_bench/image_transforms.py), giving the tensors of the PIL path
(``split.dataset(backbone.preprocess_*)``) bit for bit. A backbone whose transforms the batched
path does not reproduce keeps the PIL path. docs/methods.md, "Input pipeline", has the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from czsl_bench.image_cache import DecodedImages, ImageCache, decode_split, split_parts
from czsl_bench.image_transforms import batch_transforms

__all__ = ["DecodedSplit", "ImageBatch", "decoded_images", "eval_batches", "pipeline_choice", "train_images"]


@dataclass
class ImageBatch:
    """A collated batch of decoded images: ``pixels [B, H, W, C]`` uint8 (each image in the top
    left of the largest one's canvas), ``sizes [B, 2]`` (height, width), ``labels``, ``indices``."""

    pixels: Tensor
    sizes: Tensor
    labels: Tensor
    indices: Tensor

    def pin_memory(self) -> ImageBatch:  # DataLoader(pin_memory=True) calls this
        return ImageBatch(self.pixels.pin_memory(), self.sizes, self.labels.pin_memory(), self.indices.pin_memory())


class DecodedSplit(torch.utils.data.Dataset):
    """The images of a split from a :class:`DecodedImages` store, transformed per batch.

    Loaders collate with :meth:`collate` (the batch is built in ``__getitems__``) and call
    ``device_transform(batch, device)``, which returns ``(images [B, C, S, S] float32, labels,
    indices)`` on the device: what the PIL path yields. That is two stages, ``plan_batch`` (the
    random crops) and ``finish_batch`` (resampling), so that the trainer draws the next batch's
    crops where the PIL path would and can finish it in a background thread (on CUDA). Items
    draw no randomness (``pure_items``): training crops are drawn per batch, in the main process,
    in batch order.
    """

    pure_items = True

    def __init__(self, images: DecodedImages, labels: Tensor, transform: Any):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} decoded images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64).cpu()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        # torch's fetcher hands the whole batch of indices here: one canvas, one copy per image
        arrays = [self.images.array(int(i)) for i in indices]
        height = max((a.shape[0] for a in arrays), default=0)
        width = max((a.shape[1] for a in arrays), default=0)
        pixels = torch.zeros(len(arrays), height, width, self.images.channels, dtype=torch.uint8)
        for b, array in enumerate(arrays):
            pixels[b, :array.shape[0], :array.shape[1]] = torch.from_numpy(array)
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        sizes = torch.as_tensor([a.shape[:2] for a in arrays], dtype=torch.int64).reshape(-1, 2)
        return ImageBatch(pixels, sizes, self.labels[index], index)

    @staticmethod
    def collate(batch: ImageBatch) -> ImageBatch:
        return batch

    def plan_batch(self, batch: ImageBatch) -> tuple[ImageBatch, list | None]:
        """The batch with its random crop boxes, drawn now from the global torch generator (call
        it in the main thread, where the PIL path would draw); None for a transform without."""
        draw = getattr(self.transform, "draw_boxes", None)
        return batch, (draw(batch.sizes.tolist()) if draw is not None else None)

    def finish_batch(self, planned: tuple[ImageBatch, list | None],
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(images [B, C, S, S] float32, labels, indices)`` on ``device`` from a planned batch:
        no randomness, so any thread may run it (czsl_bench.loading.BatchFeed)."""
        batch, boxes = planned
        pixels = batch.pixels.to(device, non_blocking=True)
        images = self.transform(pixels, batch.sizes.tolist()) if boxes is None else self.transform.apply(pixels, boxes)
        return images, batch.labels.to(device, non_blocking=True), batch.indices.to(device, non_blocking=True)

    def device_transform(self, batch: ImageBatch, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        return self.finish_batch(self.plan_batch(batch), device)


def _transforms(backbone: Any) -> tuple[Any, Any] | None:
    cached = getattr(backbone, "_czsl_batch_transforms", False)
    if cached is False:
        cached = batch_transforms(backbone.preprocess_train, backbone.preprocess_eval)
        backbone._czsl_batch_transforms = cached
    return cached


def decoded_images(ctx: Any, split: Any) -> DecodedImages:
    """The decoded images of ``split`` (memoised on ``ctx``): from the decoded-image cache under
    the run's cache root, built there with a progress bar on a miss; held in memory only when
    the run has no cache."""
    memo = ctx._decoded_images
    if split.name in memo:
        return memo[split.name]
    preprocess = ctx.backbone.describe_preprocess()
    parts = split_parts(split, ctx.dataset.version, preprocess)
    cache = ImageCache(ctx.cache.root) if ctx.cache is not None else None
    store = cache.get(cache.key(**parts)) if cache is not None else None
    if store is None:
        with ctx.progress.task(f"decode {split.name} images", total=len(split)) as task:
            done = [0]

            def report(now: int, total: int) -> None:
                task.advance(now - done[0])
                done[0] = now

            # the build runs inside training; the fork keeps every random stream where it was
            with torch.random.fork_rng(devices=[]):
                if cache is not None:
                    store = cache.get_or_build(parts, split.root, split.images, report, ctx.workers,
                                               meta={"dataset": ctx.dataset_name, "split": split.name})
                else:
                    arrays = decode_split(split.root, split.images, parts["policy"]["mode"], report,
                                          workers=ctx.workers)
                    store = DecodedImages.from_arrays(arrays)
    memo[split.name] = store
    return store


PIPELINE_ENV = "CZSL_INPUT_PIPELINE"
PIPELINES = ("batched", "pil")


def pipeline_choice() -> str:
    """``$CZSL_INPUT_PIPELINE``: ``batched`` (the default) or ``pil``, the per-image PIL path the
    batched one reproduces (same numbers, slower: for checking that claim and for timing it)."""
    value = os.environ.get(PIPELINE_ENV, "").strip().lower() or "batched"
    if value not in PIPELINES:
        raise ValueError(f"{PIPELINE_ENV}={value!r} is not an input pipeline; use one of {', '.join(PIPELINES)} "
                         "(or unset it)")
    return value


def _batched(ctx: Any, split: Any) -> tuple[Any, Any] | None:
    """The batch transforms for ``split``, or None for the PIL path: a backbone whose transforms
    have no exact batched form, a split that is not a dataset's files (a test double), or
    ``CZSL_INPUT_PIPELINE=pil``."""
    from czsl_bench.datasets.czsl_format import Split

    if not isinstance(split, Split) or pipeline_choice() == "pil":
        return None
    return _transforms(ctx.backbone)


def train_images(ctx: Any, split: Any) -> torch.utils.data.Dataset:
    """The training dataset of ``split``: decoded images with the backbone's training
    augmentation per batch, or the PIL path when that augmentation cannot be batched exactly."""
    transforms = _batched(ctx, split)
    if transforms is None:
        return split.dataset(ctx.backbone.preprocess_train)
    return DecodedSplit(decoded_images(ctx, split), split.labels, transforms[0])


def eval_batches(ctx: Any, split: Any, batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(images, labels, indices)`` batches of ``split`` in order, on ``ctx.device``, with the
    backbone's evaluation transform (the PIL path's tensors)."""
    from czsl_bench.loading import loader_settings

    batch_size = batch_size or ctx.eval_batch_size
    transforms = _batched(ctx, split)
    device = torch.device(ctx.device)
    if transforms is None:
        settings = loader_settings(device, ctx.workers, decodes=True, persistent=False, items=len(split))
        loader = torch.utils.data.DataLoader(split.dataset(ctx.backbone.preprocess_eval), batch_size=batch_size,
                                             shuffle=False, generator=torch.Generator(), **settings.kwargs())
        for images, labels, indices in loader:
            yield images.to(device, non_blocking=True), labels.to(device), indices.to(device)
        return
    dataset = DecodedSplit(decoded_images(ctx, split), split.labels, transforms[1])
    settings = loader_settings(device, ctx.workers, decodes=False, pure=True, persistent=False, items=len(split))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate,
                                         generator=torch.Generator(), **settings.kwargs())
    from czsl_bench.loading import BatchFeed

    # the next batch is resampled in a background thread while the caller scores this one
    with BatchFeed(loader, device) as feed:
        for _ in range(len(loader)):
            batch = feed.next()
            feed.prepare_next()
            yield batch
