"""Fixtures and hooks shared by several test modules."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped (with the reason) on a machine without it."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def private_metadata_cache(tmp_path_factory):
    """Keep the metadata cache (czsl_bench.cache root) inside pytest's temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CZSL_CACHE", str(tmp_path_factory.getbasetemp() / "czsl-cache"))
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world on disk (tests/fixtures/toy_world.py), loaded through its plugin. Modules
    with another kind of ``world`` define their own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.toy_world import ToyPlugin, write_toy_world

    return ToyPlugin(write_toy_world(tmp_path_factory.mktemp("toy"))).load()


@pytest.fixture(scope="module")
def backbone():
    """The tiny CLIP with random weights (seed 0). Modules with another ``backbone`` define their own."""
    import torch

    from czsl_bench.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("czsl-tiny-vit", None, device="cpu")
