"""DataLoader settings: the one place that decides workers, pinned memory and prefetching.

Every loader the harness builds (the trainer's, evaluation's, the decoded-image cache's build)
asks :func:`loader_settings`; nothing else picks ``num_workers`` or ``pin_memory``. The rules
(docs/methods.md, "Input pipeline"):

* **workers**: an explicit count wins (0 = load in the main process). ``None`` means "fit the
  machine": a job of fewer than 1,000 items stays in the main process (starting workers takes
  longer); datasets that decode image files get one worker per available core but one (the
  training loop keeps a core), at most 8; datasets that only index decoded uint8 images
  (czsl_bench.image_cache) get none on the CPU, where a worker would compete with the step for
  the same cores, and up to 4 on CUDA, where they assemble batches while the GPU computes.
* **pinned memory** on CUDA only (page-locked buffers make the host-to-device copy asynchronous).
* **persistent workers** on CUDA for datasets whose items are a pure function of the index
  (``pure_items = True``): workers then live across epochs. Datasets that draw randomness in
  ``__getitem__`` (the PIL training path) keep fresh workers every epoch, whose seeds derive from
  (run seed, epoch): that is what makes a resumed run repeat an uninterrupted one.
* **prefetch**: 4 batches per worker.

Available cores are the ones this process may run on (``os.sched_getaffinity``; a container's
CPU set or ``taskset``), not the machine's count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LoaderSettings", "available_cores", "loader_settings", "pure_items"]

MAX_DECODE_WORKERS = 8
SMALL_JOB = 1000  # items: fewer load faster in the main process than worker start-up takes
MAX_INDEX_WORKERS = 4  # decoded uint8 batches on CUDA: a few workers keep the copy engine fed
PREFETCH_FACTOR = 4


def available_cores() -> int:
    """Cores this process may use (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def pure_items(dataset: Any) -> bool:
    """Whether ``dataset[i]`` draws no randomness (declared by ``pure_items = True``), so that
    neither the worker count nor persistent workers can change what a run sees."""
    return bool(getattr(dataset, "pure_items", False))


@dataclass(frozen=True)
class LoaderSettings:
    """What :func:`loader_settings` decided; ``kwargs()`` are DataLoader keyword arguments."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:  # DataLoader refuses both without workers
            out["persistent_workers"] = self.persistent_workers
            out["prefetch_factor"] = self.prefetch_factor
        return out


def loader_settings(device: torch.device | str, workers: int | None = None, *, decodes: bool,
                    pure: bool = False, persistent: bool = True, items: int | None = None) -> LoaderSettings:
    """DataLoader settings for a loader feeding ``device``.

    ``workers``: an explicit count (0 = main process) or None for the machine's default;
    ``decodes``: the dataset reads and decodes image files in ``__getitem__``; ``pure``: its
    items draw no randomness (see :func:`pure_items`); ``persistent=False`` for a loader that is
    iterated once (workers would outlive it for nothing); ``items``: how many items one pass
    loads (a small job stays in the main process).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if workers is None:
        cores = available_cores()
        if items is not None and items < SMALL_JOB:
            workers = 0
        elif decodes:
            workers = min(cores - 1, MAX_DECODE_WORKERS)
        else:
            workers = min(cores - 1, MAX_INDEX_WORKERS) if cuda else 0
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = load in the main process), got {workers}")
    return LoaderSettings(
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=cuda and persistent and pure and workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )
