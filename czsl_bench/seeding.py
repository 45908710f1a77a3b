"""Seeds and determinism: one place that seeds Python, NumPy, torch and DataLoader workers.

A run is keyed by its seed; the same seed on the same machine (and the same software) gives
the same numbers. ``deterministic=True`` additionally asks torch for deterministic kernels,
which matters on GPU (cuBLAS / cuDNN reductions) and costs some speed there.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

# Every DataLoader generator and worker seed is derived from the run seed with this offset so
# that data order does not share a stream with parameter initialisation.
_LOADER_STREAM = 0x5EED
# np.random.seed takes [0, 2**32) (torch.manual_seed more); api.SEED_LIMIT is the same number,
# kept there so parsing --seed never imports torch.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class SeedInfo:
    """What was seeded, recorded in the run record."""

    seed: int
    deterministic: bool


def seed_everything(seed: int, deterministic: bool = False) -> SeedInfo:
    """Seed ``random``, NumPy and torch (all devices); optionally switch on deterministic mode."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, {SEED_LIMIT - 1}], got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    set_deterministic(deterministic)
    return SeedInfo(seed=seed, deterministic=deterministic)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels on/off. cuBLAS needs its workspace setting before CUDA starts."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.benchmark = False  # never autotune: it picks kernels nondeterministically
    torch.backends.cudnn.deterministic = on


def loader_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A generator for one epoch's shuffling, a pure function of (seed, epoch).

    Deriving the order from the epoch (instead of advancing one generator) is what makes a
    resumed run see exactly the batches an uninterrupted run would have seen.
    """
    return torch.Generator().manual_seed(hash_seed(seed, _LOADER_STREAM, epoch))


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy and ``random`` in each worker from torch's seed.

    torch already gives every worker ``base_seed + worker_id``; NumPy and ``random`` would
    otherwise be copies of the parent's state in every worker (identical augmentations).
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def hash_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (stable across processes, unlike ``hash``)."""
    h = 0xCBF29CE484222325
    for part in parts:
        for byte in int(part).to_bytes(8, "little", signed=True):
            h ^= byte
            h = (h * 0x100000001B3) % 2**64
    return h % 2**63
