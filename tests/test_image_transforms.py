"""Batched uint8 transforms give the PIL path's tensors and random draws bit for bit
(czsl_bench/image_transforms.py), on the embedded world and on real-format JPEGs at 224 px."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from czsl_bench.backbone import load_backbone
from czsl_bench.datasets.czsl_format import decode_image
from czsl_bench.image_transforms import batch_transforms, resample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.czsl_real_format import PHOTO_SIZES, photo_split  # noqa: E402

BACKENDS = ("pillow", "torch")


def _canvas(arrays: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    height, width = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    canvas = torch.zeros(len(arrays), height, width, 3, dtype=torch.uint8)
    for b, a in enumerate(arrays):
        canvas[b, :a.shape[0], :a.shape[1]] = torch.from_numpy(a)
    return canvas, [a.shape[:2] for a in arrays]


def _assert_exact(backbone, images, backend: str) -> None:
    """Eval and train tensors equal the PIL path's, and the train crops leave the global torch
    generator exactly where the PIL path leaves it."""
    train, evaluate = batch_transforms(backbone.preprocess_train, backbone.preprocess_eval)
    canvas, sizes = _canvas([np.array(im) for im in images])
    expected = torch.stack([backbone.preprocess_eval(im) for im in images])
    assert torch.equal(evaluate(canvas, sizes, backend), expected)
    torch.manual_seed(123)
    expected = torch.stack([backbone.preprocess_train(im) for im in images])
    after_pil = torch.get_rng_state()
    torch.manual_seed(123)
    got = train(canvas, sizes, backend)
    assert torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), after_pil)
    assert got.is_contiguous() and got.dtype == torch.float32


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("czsl-tiny-vit", None, device="cpu")


@pytest.fixture(scope="module")
def vit224():
    return load_backbone("ViT-B-32-quickgelu", None, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    split = photo_split(tmp_path_factory.mktemp("photos"), 2 * len(PHOTO_SIZES))
    return [decode_image(split.image_path(i)) for i in range(len(split))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_format_jpegs_at_224_px_match_the_pil_path(vit224, photos, backend):
    # landscape, portrait, UT-Zappos' 136x102 (upscaled), square, large, 60x400: up- and
    # downscaling, both passes, skipped passes, ragged batches
    _assert_exact(vit224, photos, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_world_images_match_the_pil_path(tiny, backend):
    from czsl_bench.datasets.synthetic import plugin

    split = plugin.load().split("train")
    images = [decode_image(split.image_path(i)) for i in range(0, len(split), 23)]
    _assert_exact(tiny, images, backend)


def test_pure_noise_and_odd_sizes_match_pillow_bilinear_and_bicubic():
    """Noise is where rounding shows: every output byte equals Pillow's resize, both filters."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 29), (64, 64), (5, 300), (200, 90))]
    canvas, _ = _canvas(arrays)
    for filt, mode in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
        boxes = [(1, 2, a.shape[0] - 3, a.shape[1] - 2) for a in arrays]
        sizes = [(48, 70), (64, 64), (9, 150), (31, 31)]
        for backend in BACKENDS:
            got = resample(canvas, boxes, sizes, (9, 31), None, filt, backend)
            for b, (a, (t, left, h, w), (rh, rw)) in enumerate(zip(arrays, boxes, sizes)):
                want = np.asarray(Image.fromarray(a).crop((left, t, left + w, t + h)).resize((rw, rh), mode))[:9, :31]
                assert np.array_equal(got[b].permute(1, 2, 0).numpy(), want), (filt, backend, b)


def test_transforms_that_cannot_be_batched_exactly_are_refused():
    from torchvision import transforms as T

    bb_like = load_backbone("czsl-tiny-vit", None, device="cpu")
    assert batch_transforms(bb_like.preprocess_train, bb_like.preprocess_eval) is not None
    jitter = T.Compose([T.ColorJitter(0.4), *bb_like.preprocess_train.transforms])
    squash = T.Compose([T.Resize((64, 64)), *bb_like.preprocess_eval.transforms[2:]])
    nearest = T.Compose([T.RandomResizedCrop(64, interpolation=T.InterpolationMode.NEAREST),
                         *bb_like.preprocess_train.transforms[1:]])
    assert batch_transforms(jitter, bb_like.preprocess_eval) is None
    assert batch_transforms(bb_like.preprocess_train, squash) is None
    assert batch_transforms(nearest, bb_like.preprocess_eval) is None
    with pytest.raises(ValueError, match="unknown resampling backend"):
        resample(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), [(0, 0, 4, 4)], [(2, 2)], (2, 2), backend="cuda")


# -- the crop sampler ---------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from czsl_bench import image_transforms  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       sizes=st.lists(st.tuples(st.integers(1, 600), st.integers(1, 600)), min_size=1, max_size=40),
       scale=st.sampled_from([(0.9, 1.0), (0.08, 1.0), (0.5, 0.5), (0.3, 0.9)]),
       ratio=st.sampled_from([(3 / 4, 4 / 3), (0.5, 2.0), (1.0, 1.0), (0.2, 5.0)]))
def test_the_direct_crop_sampler_draws_what_torchvision_draws(seed, sizes, scale, ratio):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    want = [tuple(RandomResizedCrop.get_params(torch.empty(()).expand(3, h, w), list(scale), list(ratio)))
            for h, w in sizes]
    want_state = torch.get_rng_state()
    torch.manual_seed(seed)
    draw = image_transforms._direct_crop(scale, ratio)
    assert [draw(h, w) for h, w in sizes] == want
    assert torch.equal(torch.get_rng_state(), want_state)  # the same advance: dropout after it sees the same stream


def test_the_crop_sampler_is_the_direct_one_only_if_the_probe_agrees(monkeypatch):
    scale, ratio = (0.9, 1.0), (3 / 4, 4 / 3)
    image_transforms.crop_sampler.cache_clear()
    try:
        assert image_transforms.crop_sampler(scale, ratio).__qualname__.startswith("_direct_crop")
        image_transforms.crop_sampler.cache_clear()
        honest = image_transforms._direct_crop

        def off_by_one(scale, ratio):  # a torchvision whose sampling differs from the direct one
            inner = honest(scale, ratio)
            return lambda h, w: tuple(v + (i == 0) for i, v in enumerate(inner(h, w)))

        monkeypatch.setattr(image_transforms, "_direct_crop", off_by_one)
        torch.manual_seed(5)
        before = torch.get_rng_state()
        chosen = image_transforms.crop_sampler(scale, ratio)
        assert chosen.__qualname__.startswith("_torchvision_crop")
        assert torch.equal(torch.get_rng_state(), before)  # the probe draws on a forked generator
    finally:
        image_transforms.crop_sampler.cache_clear()


def test_threaded_pillow_resampling_gives_the_single_threaded_bytes(monkeypatch):
    import os

    rng = np.random.default_rng(3)
    canvas = torch.from_numpy(rng.integers(0, 256, (12, 240, 320, 3), dtype=np.uint8))
    boxes = [(int(t), int(l), 200, 260) for t, l in rng.integers(0, 40, (12, 2))]
    sizes, keep = [(224, 291)] * 12, [(0, 33)] * 12
    monkeypatch.setattr(image_transforms, "_POOL", (os.getpid(), 1, None))
    single = resample(canvas, boxes, sizes, (224, 224), keep, backend="pillow")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        monkeypatch.setattr(image_transforms, "_POOL", (os.getpid(), 4, pool))
        threaded = resample(canvas, boxes, sizes, (224, 224), keep, backend="pillow")
    assert torch.equal(single, threaded)
    monkeypatch.setattr(image_transforms, "_POOL", (-1, 4, None))  # a forked child rebuilds its pool
    assert image_transforms._resample_pool()[0] == min(4, __import__("czsl_bench.loading").loading.available_cores())
