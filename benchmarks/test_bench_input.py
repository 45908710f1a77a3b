"""Input pipeline throughput: the decoded-image cache + batched transforms against today's PIL path.

Run: ``pytest benchmarks/test_bench_input.py --benchmark-only``. Both paths are measured in one
run, one after the other per case (the shared machine's load changes minute to minute), on the
embedded world (64 px PNGs, the tiny backbone's transforms) and on real-format JPEGs at 224 px
(320x240 photos, the ViT transforms). Each round produces the tensors a training step or the
evaluation receives, from the files (PIL) or from the cache entry (cached, built before timing).
Figures and the machine are in docs/methods.md, "Input pipeline".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from czsl_bench.cache import FeatureCache
from czsl_bench.image_data import DecodedSplit, decoded_images
from czsl_bench.image_transforms import batch_transforms
from czsl_bench.method import NullProgress

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.czsl_real_format import photo_split  # noqa: E402

BATCH = 64
N_IMAGES = 512


class _Ctx:
    """The parts of a RunContext that decoded_images reads."""

    def __init__(self, dataset, backbone_like, cache_root):
        self.dataset, self.backbone, self.dataset_name = dataset, backbone_like, dataset.name
        self.cache, self.progress, self.workers = FeatureCache(cache_root), NullProgress(), 0
        self._decoded_images = {}


class _Preprocess:
    """A backbone stand-in: its two transforms and their cache-key description."""

    def __init__(self, train, evaluate, size):
        self.preprocess_train, self.preprocess_eval, self.size = train, evaluate, size

    def describe_preprocess(self):
        return {"size": [self.size, self.size], "mode": "RGB", "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from czsl_bench.backbone import load_backbone
    from czsl_bench.datasets.synthetic import plugin

    world = plugin.load()
    bb = load_backbone("czsl-tiny-vit", "synthetic", device="cpu")
    split = world.split("train")
    split = type(split)(**{**split.__dict__, "images": split.images[:N_IMAGES], "labels": split.labels[:N_IMAGES]})
    return world, _Preprocess(bb.preprocess_train, bb.preprocess_eval, 64), split, tmp_path_factory.mktemp("c64")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("photos")
    split = photo_split(root, N_IMAGES, sizes=((240, 320),), split="train")
    backbone = _Preprocess(open_clip.image_transform(224, is_train=True), open_clip.image_transform(224, is_train=False), 224)
    return split, backbone, tmp_path_factory.mktemp("c224")


def _pil(split, transform) -> int:
    loader = torch.utils.data.DataLoader(split.dataset(transform), batch_size=BATCH, shuffle=False, num_workers=0)
    return sum(images.shape[0] for images, _, _ in loader)


def _cached(dataset: DecodedSplit) -> int:
    n = 0
    for start in range(0, len(dataset), BATCH):
        images, _, _ = dataset.device_transform(dataset.__getitems__(range(start, min(start + BATCH, len(dataset)))),
                                                torch.device("cpu"))
        n += images.shape[0]
    return n


def _measure(benchmark, run, arg):
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # docs/datasets.md: one thread is the fast way to load in the main process
    try:
        n = benchmark.pedantic(run, args=(arg,), rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    assert n == N_IMAGES
    if not benchmark.disabled and benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(N_IMAGES / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("path", ["pil", "cached"])
@pytest.mark.parametrize("phase", ["train", "eval"])
def test_bench_embedded_world_64px(benchmark, embedded, phase, path):
    world, backbone, split, cache_root = embedded
    transform = backbone.preprocess_train if phase == "train" else backbone.preprocess_eval
    if path == "pil":
        return _measure(benchmark, lambda s: _pil(s, transform), split)
    train, evaluate = batch_transforms(backbone.preprocess_train, backbone.preprocess_eval)
    store = decoded_images(_Ctx(world, backbone, cache_root), split)
    _measure(benchmark, _cached, DecodedSplit(store, split.labels, train if phase == "train" else evaluate))


@pytest.mark.parametrize("path", ["pil", "cached"])
@pytest.mark.parametrize("phase", ["train", "eval"])
def test_bench_real_format_jpeg_224px(benchmark, photos, phase, path):
    split, backbone, cache_root = photos
    transform = backbone.preprocess_train if phase == "train" else backbone.preprocess_eval
    if path == "pil":
        return _measure(benchmark, lambda s: _pil(s, transform), split)
    train, evaluate = batch_transforms(backbone.preprocess_train, backbone.preprocess_eval)

    class Dataset:  # decoded_images reads the dataset's content version
        name, version = "photos", "bench"

    store = decoded_images(_Ctx(Dataset(), backbone, cache_root), split)
    _measure(benchmark, _cached, DecodedSplit(store, split.labels, train if phase == "train" else evaluate))
