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
