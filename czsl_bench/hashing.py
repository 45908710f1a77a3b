"""Content hashes: the one place that says how files, text lists, tensors and JSON values hash.

Every cache key, checksum and fingerprint in czsl-bench is built from these, so two parts of the
code never disagree on what "the same content" means.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    """sha256 of ``lines``, each followed by a newline: the way large lists enter a key."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over ``name, dtype, shape, bytes`` of each tensor, in name order.

    Independent of the file format the tensors came from (weights, cache entries)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: the bytes a fingerprint hashes (floats as repr)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def short_hash(value: Any, length: int = 16) -> str:
    """sha256 of :func:`canonical_json` of ``value``, hex, first ``length`` characters."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]
