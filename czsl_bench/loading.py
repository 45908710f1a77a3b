"""DataLoader settings: the one place that decides workers, pinned memory and prefetching.

Every loader the harness builds (the trainer's, evaluation's, the decoded-image cache's build)
asks :func:`loader_settings`; nothing else picks ``num_workers`` or ``pin_memory``. The rules
(docs/methods.md, "Input pipeline"):

* **workers**: an explicit count wins (0 = load in the main process). ``None`` means "fit the
  machine": a job of fewer than 1,000 items stays in the main process (starting workers takes
  longer); datasets that decode image files get one worker per available core but one (the
  training loop keeps a core), at most 8, or one per core when the main process only collects
  what they decode (``main_waits``: the decoded-image cache's build); datasets that only index
  decoded uint8 images (czsl_bench.image_cache) get none on the CPU, where a worker would compete with the step for
  the same cores, and up to 4 on CUDA, where they assemble batches while the GPU computes.
* **pinned memory** on CUDA only (page-locked buffers make the host-to-device copy asynchronous).
* **persistent workers** on CUDA for datasets whose items are a pure function of the index
  (``pure_items = True``): workers then live across epochs. Datasets that draw randomness in
  ``__getitem__`` (the PIL training path) keep fresh workers every epoch, whose seeds derive from
  (run seed, epoch): that is what makes a resumed run repeat an uninterrupted one.
* **prefetch**: 4 batches per worker.
* **the next batch in a background thread** (:class:`BatchFeed`): a dataset that splits its
  per-batch work into ``plan_batch`` (the random draws, in the main thread, where the PIL path
  would draw) and ``finish_batch`` (pure: resampling, normalizing, the copy to the device) has
  batch i+1 finished in one background thread while step i runs its backward pass on CUDA
  (:func:`finish_in_background`; on the CPU it is finished in the main thread, right there).
  The draws stay in the main thread's order, so the numbers do not change.

Available cores are the ones this process may run on (``os.sched_getaffinity``; a container's
CPU set or ``taskset``), not the machine's count.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchFeed", "LoaderSettings", "available_cores", "finish_in_background", "loader_settings", "pure_items",
           "to_device"]

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
                    pure: bool = False, persistent: bool = True, items: int | None = None,
                    main_waits: bool = False) -> LoaderSettings:
    """DataLoader settings for a loader feeding ``device``.

    ``workers``: an explicit count (0 = main process) or None for the machine's default;
    ``decodes``: the dataset reads and decodes image files in ``__getitem__``; ``pure``: its
    items draw no randomness (see :func:`pure_items`); ``persistent=False`` for a loader that is
    iterated once (workers would outlive it for nothing); ``items``: how many items one pass
    loads (a small job stays in the main process); ``main_waits``: the main process does nothing
    but collect the items, so a decoding job may take every core (with one core: none).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if workers is None:
        cores = available_cores()
        if items is not None and items < SMALL_JOB:
            workers = 0
        elif decodes:
            workers = min(cores if main_waits and cores > 1 else cores - 1, MAX_DECODE_WORKERS)
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


def finish_in_background(device: torch.device | str) -> bool:
    """Whether :class:`BatchFeed` finishes batches in a background thread: on CUDA, where the
    host thread only queues kernels and the finishing's own host work (fetching, planning the
    gathers) can overlap the GPU's step; not on the CPU, where it was measured not to pay: on 2
    cores with 1 torch thread it hid 2.0 s of finishing and cost the step 2.3 s (the two threads
    take turns holding the GIL), with 2 torch threads it cost the step 4-13 s (the pool's threads
    wait for the one the background thread preempted). docs/methods.md, "Input pipeline"."""
    return torch.device(device).type == "cuda"


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or lists, tuples and dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class BatchFeed:
    """A loader's batches on ``device``, the next one finished in a background thread.

    ``next()`` returns the next batch, ready; ``prepare_next()`` fetches the one after it and
    plans it *now* (its random draws happen in the calling thread, in order), then finishes it
    in the background. The trainer calls ``prepare_next()`` right after a step's forward pass,
    where nothing draws until the next forward: the PIL path drew the next batch's crops after
    the optimizer step, and backward and optimizer steps draw nothing, so the random stream is
    the same draw for draw. Datasets without ``plan_batch``/``finish_batch`` are fetched and moved
    in ``next()`` (through their ``device_transform`` if they have one), as before.
    """

    def __init__(self, loader: Any, device: torch.device | str, background: bool | None = None):
        self.device = torch.device(device)
        self._dataset = loader.dataset
        self._plan = getattr(self._dataset, "plan_batch", None)
        self._finish = getattr(self._dataset, "finish_batch", None)
        self._staged = self._plan is not None and self._finish is not None
        self._transform = getattr(self._dataset, "device_transform", None)
        self._batches = iter(loader)
        self._left = len(loader)
        self.background = self._staged and (finish_in_background(self.device) if background is None else background)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="czsl-batch") if self.background else None
        self._pending: Future | None = None

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def prepare_next(self) -> None:
        """Fetch and plan the next batch here, finish it in the background (staged datasets)."""
        if not self._staged or self._pending is not None or self._left == 0:
            return
        planned = self._plan(next(self._batches))
        self._left -= 1
        if self._pool is not None:
            self._pending = self._pool.submit(self._finish_quietly, planned)
        else:  # no spare core: finish it now, in this thread (still after the forward's draws)
            done: Future = Future()
            done.set_result(self._finish(planned, self.device))
            self._pending = done

    def _finish_quietly(self, planned: Any) -> Any:
        with torch.no_grad():  # grad mode is per thread; nothing here needs a graph
            return self._finish(planned, self.device)

    def next(self) -> Any:
        """The next batch on the device (waits for the background thread if it is still busy)."""
        if self._staged:
            self.prepare_next()
            if self._pending is None:
                raise StopIteration
            pending, self._pending = self._pending, None
            return pending.result()
        if self._left == 0:
            raise StopIteration
        batch = next(self._batches)
        self._left -= 1
        return self._transform(batch, self.device) if self._transform is not None else to_device(batch, self.device)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
