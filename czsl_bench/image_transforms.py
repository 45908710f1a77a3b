"""Batched image transforms on uint8 tensors that give the PIL path's tensors bit for bit.

The backbone's transforms (open_clip, ``docs/backbone.md``) run on one PIL image at a time:
training is ``RandomResizedCrop(S, scale, ratio, bicubic)``, evaluation is a shortest-side
bicubic resize to S and a center crop, both followed by ``ToTensor`` and ``Normalize``. Here the
same geometry is applied to a whole batch of decoded uint8 images (``docs/backbone.md``,
"Decoded-image cache"), on the CPU or the GPU:

* **Resampling** is Pillow's own algorithm (``libImaging/Resample.c``), not torch's
  ``interpolate``: coefficients computed in double exactly as Pillow does, rounded to its 22-bit
  fixed point, a horizontal then a vertical pass with Pillow's rounding and clipping to uint8
  after each. The passes are integer gathers (int32, as Pillow sums), so the result is
  bit-identical to ``PIL.Image.resize`` on every device; torch's antialiased bicubic differs from
  Pillow by a level here and there, which would make the cached path change the numbers.
* **Random crops** are drawn as torchvision's ``RandomResizedCrop.get_params`` draws them, from
  the global torch generator, one image after the other in batch order: exactly the draws the
  PIL path makes in the DataLoader (0 workers), so the training stream and dropout after it stay
  where they were. The sampler makes get_params' generator calls itself (faster), and is used
  only after a probe shows it equal to the installed torchvision's (:func:`crop_sampler`). The
  trainer reseeds that generator from the run seed (czsl_bench/training.py), and draws a batch's
  crops in the main thread where the PIL path would, while :meth:`TrainTransform.apply` may run
  in a background thread (czsl_bench/loading.py, ``BatchFeed``).
* **ToTensor + Normalize** use the same float32 operations in the same order.

A transform that is not one of these two shapes (another resize mode, colour jitter, ...) is
not translated: :func:`batch_transforms` returns None and callers keep the PIL path.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EvalTransform", "TrainTransform", "batch_transforms", "crop_sampler", "normalize", "resample"]

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point: 8-bit pixels, 2 bits of headroom in int32
_HALF = 1 << (_PRECISION_BITS - 1)


def _bicubic(x: float) -> float:
    # Pillow's bicubic_filter with a = -0.5 (torch's plain bicubic uses -0.75)
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.lru_cache(maxsize=4096)
def _coeffs(in_size: int, in0: float, in1: float, out_size: int, filt: str) -> tuple[Tensor, Tensor]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: for every output position the
    first input index and the int32 weights of its taps, as ``(first [out], weights [out, taps])``.

    Plain Python floats are C doubles, and the operations follow Resample.c in order (including
    the sequential weight sum), so the rounded fixed-point weights are Pillow's."""
    kernel, base_support = _FILTERS[filt]
    scale = filterscale = (in1 - in0) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    first = []
    rows = []
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [kernel((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in ws:
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
        fixed = [int(-0.5 + w * (1 << _PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << _PRECISION_BITS))
                 for w in ws]
        first.append(xmin)
        rows.append(fixed + [0] * (ksize - len(fixed)))
    return torch.tensor(first, dtype=torch.int64), torch.tensor(rows, dtype=torch.int32)


def _identity(n: int) -> tuple[Tensor, Tensor]:
    # a pass Pillow skips: one tap of weight 1.0 reproduces the input exactly
    return torch.arange(n, dtype=torch.int64), torch.full((n, 1), 1 << _PRECISION_BITS, dtype=torch.int32)


def _axis(canvas: int, crops: Sequence[tuple[int, int]], resized: Sequence[int], keeps: Sequence[int],
          out: int, filt: str) -> tuple[Tensor, Tensor] | None:
    """Row tables of one pass over a batch: ``index [B * out, taps]`` into the batch's rows
    ``b * canvas + i`` and int32 ``weight [B * out, taps]``; None when the pass is the identity
    for every image (Pillow would skip it).

    ``crops[b] = (start, length)``: the window of the axis that is resized to ``resized[b]``
    positions, of which ``out`` from ``keeps[b]`` on are kept (a center crop after the resize)."""
    if all(c == (0, out) and r == out and k == 0 for c, r, k in zip(crops, resized, keeps)):
        return None
    firsts, weights = [], []
    for (_, length), size, keep in zip(crops, resized, keeps):
        # Pillow skips a pass whose length does not change: the resize box is the whole crop
        first, weight = _identity(size) if length == size else _coeffs(length, 0.0, float(length), size, filt)
        firsts.append(first[keep:keep + out])
        weights.append(weight[keep:keep + out])
    taps = max(w.shape[1] for w in weights)
    # images of one batch may need different tap counts (up- and downscaling): pad with weight 0
    weight = torch.stack([w if w.shape[1] == taps else torch.nn.functional.pad(w, (0, taps - w.shape[1]))
                          for w in weights])
    start = torch.tensor([c[0] for c in crops], dtype=torch.int64)[:, None, None]
    last = torch.tensor([c[1] - 1 for c in crops], dtype=torch.int64)[:, None, None]
    row0 = (torch.arange(len(crops), dtype=torch.int64) * canvas)[:, None, None]
    # taps past the crop's last pixel have weight 0; clamping keeps their row inside the image
    index = (torch.stack(firsts)[:, :, None] + torch.arange(taps)).minimum(last) + start + row0
    return index.reshape(-1, taps), weight.reshape(-1, taps)


def _pass(rows: Tensor, tables: tuple[Tensor, Tensor], device: torch.device) -> Tensor:
    """One Pillow pass: every output row is the fixed-point weighted sum of a few input rows,
    rounded down after adding one half and clipped to 0..255 (Pillow's ``clip8``)."""
    index, weight = (t.to(device, non_blocking=True) for t in tables)
    acc = torch.full((index.shape[0], rows.shape[1]), _HALF, dtype=torch.int32, device=device)
    for t in range(index.shape[1]):
        acc += rows.index_select(0, index[:, t]) * weight[:, t:t + 1]
    return (acc >> _PRECISION_BITS).clamp_(0, 255)


def resample(pixels: Tensor, boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[tuple[int, int]],
             out_size: tuple[int, int], keep: Sequence[tuple[int, int]] | None = None,
             filt: str = "bicubic", backend: str | None = None) -> Tensor:
    """Crop and resize every image of a uint8 batch exactly as Pillow would.

    ``pixels``: ``[B, H, W, C]`` uint8, image b in its top-left ``boxes``-covering corner (a
    batch of images of different sizes is padded to the largest); ``boxes[b] = (top, left,
    height, width)``: the crop of image b; ``sizes[b] = (rh, rw)``: the size the crop is resized
    to; ``keep[b] = (top, left)``: the ``out_size`` window of that resized image to return (a
    center crop after the resize; default (0, 0)). Returns ``[B, C, out_h, out_w]`` uint8,
    contiguous, on the pixels' device.

    ``backend``: ``"pillow"`` calls Pillow image by image (its C loops are the fastest exact
    resampler on a CPU), ``"torch"`` runs the two passes as batched integer tensor operations
    (the GPU path); default: pillow on the CPU, torch elsewhere. Both give Pillow's bytes.
    """
    keep = list(keep) if keep is not None else [(0, 0)] * len(boxes)
    backend = backend or ("pillow" if pixels.device.type == "cpu" else "torch")
    if backend == "pillow":
        return _resample_pillow(pixels, boxes, sizes, out_size, keep, filt)
    if backend != "torch":
        raise ValueError(f"unknown resampling backend {backend!r}; use 'pillow' or 'torch'")
    return _resample_torch(pixels, boxes, sizes, out_size, keep, filt)


def _resample_pillow(pixels, boxes, sizes, out_size, keep, filt) -> Tensor:
    import numpy as np
    from PIL import Image

    mode = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[filt]
    oh, ow = out_size
    array = pixels.numpy()
    out = np.empty((len(boxes), oh, ow, array.shape[3]), dtype=np.uint8)

    def resize(indices: range) -> None:
        for b in indices:
            (top, left, h, w), (rh, rw), (kt, kl) = boxes[b], sizes[b], keep[b]
            # torchvision's order: crop, resize (Pillow returns a copy when the size is unchanged), crop
            image = Image.fromarray(array[b, top:top + h, left:left + w])
            if (rw, rh) != (w, h):
                image = image.resize((rw, rh), mode)
            out[b] = np.asarray(image)[kt:kt + oh, kl:kl + ow]

    threads, pool = _resample_pool()
    pixels_per_image = sum(h * w + rh * rw for (_, _, h, w), (rh, rw) in zip(boxes, sizes)) / max(1, len(boxes))
    if pool is None or len(boxes) < 2 * threads or pixels_per_image < _THREADED_PIXELS:
        resize(range(len(boxes)))
    else:  # each image on its own: the threads change which core, not what a pixel becomes
        step = -(-len(boxes) // threads)
        list(pool.map(resize, [range(i, min(i + step, len(boxes))) for i in range(0, len(boxes), step)]))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


_POOL: tuple[int, int, ThreadPoolExecutor | None] | None = None
# below this (crop + resized pixels per image) the threads' turns at the GIL cost more than the
# resampling they share: 64 px images resample 1.4x slower on 2 threads, 224 px photos 1.4-2x faster
_THREADED_PIXELS = 2 * 128 * 128


def _resample_pool() -> tuple[int, ThreadPoolExecutor | None]:
    """``(threads, pool)`` for Pillow's resampling: one thread per available core (at most 4);
    no pool on one core.

    Pillow releases the GIL while it resamples, and the trainer resamples on the CPU while the
    step waits for the batch (czsl_bench.loading.BatchFeed), so the cores are otherwise idle:
    2 threads on 2 cores resample batches of 320x240 photos to 224 px 1.4-2.0x faster (64 px images
    stay on one thread, see ``_THREADED_PIXELS``). A forked DataLoader worker builds its own pool.
    """
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        from czsl_bench.loading import available_cores

        threads = min(available_cores(), 4)
        _POOL = (os.getpid(), threads,
                 ThreadPoolExecutor(threads, thread_name_prefix="czsl-resample") if threads > 1 else None)
    return _POOL[1], _POOL[2]


def _resample_torch(pixels, boxes, sizes, out_size, keep, filt) -> Tensor:
    order = _pass_order()
    if order is None:  # an unknown Pillow: resample with Pillow itself, then move the result back
        out = _resample_pillow(pixels.cpu(), boxes, sizes, out_size, keep, filt)
        return out.to(pixels.device)
    firsts = [order(b[2], b[3], s[0], s[1]) for b, s in zip(boxes, sizes)]
    if len(set(firsts)) <= 1:
        return _torch_passes(pixels, boxes, sizes, out_size, keep, filt, bool(firsts and firsts[0]))
    out = torch.empty(len(boxes), pixels.shape[3], *out_size, dtype=torch.uint8, device=pixels.device)
    for vertical_first in (False, True):
        group = [b for b, f in enumerate(firsts) if f == vertical_first]
        index = torch.tensor(group, device=pixels.device)
        out[index] = _torch_passes(pixels.index_select(0, index), [boxes[b] for b in group],
                                   [sizes[b] for b in group], out_size, [keep[b] for b in group], filt,
                                   vertical_first)
    return out


def _torch_passes(pixels, boxes, sizes, out_size, keep, filt, vertical_first: bool) -> Tensor:
    n, height, width, c = pixels.shape
    oh, ow = out_size
    device = pixels.device
    horizontal = _axis(width, [(b[1], b[3]) for b in boxes], [s[1] for s in sizes], [k[1] for k in keep], ow, filt)
    vertical = _axis(height, [(b[0], b[2]) for b in boxes], [s[0] for s in sizes], [k[0] for k in keep], oh, filt)
    x = pixels.permute(0, 3, 1, 2)  # [B, C, H, W]

    def across(x: Tensor) -> Tensor:  # horizontal pass: one row per image column
        if horizontal is None:
            return x[:, :, :, :ow]
        rows = x.permute(0, 3, 1, 2).reshape(n * x.shape[3], c * x.shape[2]).to(torch.int32)
        return _pass(rows, horizontal, device).view(n, ow, c, x.shape[2]).permute(0, 2, 3, 1)

    def down(x: Tensor) -> Tensor:  # vertical pass: one row per image row
        if vertical is None:
            return x[:, :, :oh, :]
        rows = x.permute(0, 2, 1, 3).reshape(n * x.shape[2], c * x.shape[3]).to(torch.int32)
        return _pass(rows, vertical, device).view(n, oh, c, x.shape[3]).permute(0, 2, 1, 3)

    x = across(down(x)) if vertical_first else down(across(x))
    return x.to(torch.uint8).contiguous()


# Which pass Pillow runs first decides its rounding (each pass rounds to uint8). Pillow up to 12
# always starts with the horizontal pass; Pillow 13 starts with the vertical one when it shrinks
# the rows by more than twice what the horizontal pass shrinks the columns (found by comparing
# the two orders against Pillow on 2,976 random sizes; docs/methods.md, "Input pipeline").
def _horizontal_first(h: int, w: int, oh: int, ow: int) -> bool:
    return False


def _by_reduction(h: int, w: int, oh: int, ow: int) -> bool:
    return oh < h and (h - oh) > 2 * (w - ow)


@functools.lru_cache(maxsize=1)
def _pass_order():
    """The installed Pillow's pass order (one of the two above), or None when it matches neither:
    the torch backend then resamples with Pillow itself, exact but not on the GPU."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # sizes where the two orders give different bytes, and where both say horizontal first
    probes = [((60, 60), (10, 50)), ((60, 60), (10, 30)), ((60, 60), (70, 120)), ((40, 90), (7, 74)),
              ((40, 90), (7, 73)), ((90, 40), (24, 8))]
    for rule in (_by_reduction, _horizontal_first):
        agrees = True
        for (h, w), (oh, ow) in probes:
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            want = np.asarray(Image.fromarray(array).resize((ow, oh), Image.Resampling.BICUBIC))
            got = _torch_passes(torch.from_numpy(array)[None], [(0, 0, h, w)], [(oh, ow)], (oh, ow), [(0, 0)],
                                "bicubic", rule(h, w, oh, ow))
            if not np.array_equal(got[0].permute(1, 2, 0).numpy(), want):
                agrees = False
                break
        if agrees:
            return rule
    return None


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``Normalize(mean, std)(ToTensor()(img))`` of a uint8 batch, with torchvision's float32
    operations in its order (divide by 255, subtract the mean, divide by the std)."""
    x = images.to(torch.get_default_dtype()).div_(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


@dataclass(frozen=True)
class EvalTransform:
    """open_clip's eval transform: shortest side to ``size`` (Pillow), center crop, normalize."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def plan(self, image_hw: tuple[int, int]) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """(box, resized size, kept window) of one image, as torchvision computes them."""
        h, w = image_hw
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        rh, rw = (new_long, self.size) if w <= h else (self.size, new_long)
        top = int(round((rh - self.size) / 2.0))
        left = int(round((rw - self.size) / 2.0))
        return (0, 0, h, w), (rh, rw), (top, left)

    def __call__(self, pixels: Tensor, image_hw: Sequence[tuple[int, int]], backend: str | None = None) -> Tensor:
        plans = [self.plan(tuple(map(int, hw))) for hw in image_hw]
        out = resample(pixels, [p[0] for p in plans], [p[1] for p in plans], (self.size, self.size),
                       [p[2] for p in plans], self.interpolation, backend)
        return normalize(out, self.mean, self.std)


@dataclass(frozen=True)
class TrainTransform:
    """open_clip's train transform: ``RandomResizedCrop(size, scale, ratio)`` (Pillow), normalize.

    Two stages, so that a batch can be finished off the main thread: :meth:`draw_boxes` takes
    the random crops (the global torch generator, in batch order: call it where the PIL path
    would draw), :meth:`apply` resamples and normalizes (no randomness)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def crop(self, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """One crop box ``(top, left, height, width)``, drawn from the global torch generator:
        the values and the generator's advance of torchvision's ``get_params``."""
        return self.draw_boxes([image_hw])[0]

    def draw_boxes(self, image_hw: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """One crop box per image, in order (see :func:`crop_sampler`)."""
        draw = crop_sampler(tuple(self.scale), tuple(self.ratio))
        return [draw(int(h), int(w)) for h, w in image_hw]

    def apply(self, pixels: Tensor, boxes: Sequence[tuple[int, int, int, int]], backend: str | None = None) -> Tensor:
        """The crops ``boxes`` of a uint8 batch, resized to ``size`` and normalized."""
        out = resample(pixels, boxes, [(self.size, self.size)] * len(boxes), (self.size, self.size),
                       None, self.interpolation, backend)
        return normalize(out, self.mean, self.std)

    def __call__(self, pixels: Tensor, image_hw: Sequence[tuple[int, int]], backend: str | None = None) -> Tensor:
        return self.apply(pixels, self.draw_boxes(image_hw), backend)


def _torchvision_crop(scale: tuple[float, float], ratio: tuple[float, float]):
    from torchvision.transforms import RandomResizedCrop

    def draw(h: int, w: int) -> tuple[int, int, int, int]:
        shape = torch.empty(()).expand(3, h, w)  # get_params only reads the dimensions
        return tuple(int(v) for v in RandomResizedCrop.get_params(shape, list(scale), list(ratio)))

    return draw


def _direct_crop(scale: tuple[float, float], ratio: tuple[float, float]):
    """``RandomResizedCrop``'s sampling (torchvision's documented algorithm: up to ten trials of a
    uniform area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first
    that fits placed uniformly; else the centred crop of the ratio clamped to ``ratio``), with
    the same generator calls on reused one-element tensors: about 8 times faster than
    ``get_params``, which builds its tensors anew on every trial."""
    log_lo, log_hi = (float(v) for v in torch.log(torch.tensor(ratio)))
    lo, hi = float(scale[0]), float(scale[1])
    unit = torch.empty(1)
    expd = torch.empty(1)
    offset = torch.empty(1, dtype=torch.int64)
    low_ratio, high_ratio = min(ratio), max(ratio)

    def draw(h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        for _ in range(10):
            target = area * unit.uniform_(lo, hi).item()
            aspect = torch.exp(unit.uniform_(log_lo, log_hi), out=expd).item()
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(offset.random_(0, h - ch + 1).item())
                left = int(offset.random_(0, w - cw + 1).item())
                return top, left, ch, cw
        shape = float(w) / float(h)
        if shape < low_ratio:
            cw, ch = w, int(round(w / low_ratio))
        elif shape > high_ratio:
            cw, ch = int(round(h * high_ratio)), h
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    return draw


# image sizes for the probe: square, landscape, portrait, UT-Zappos', and shapes outside the
# ratio range, where the fallback branch decides
_CROP_PROBE_SIZES = [(64, 64), (240, 320), (320, 240), (102, 136), (60, 400), (400, 60), (3, 2), (1, 1)]


@functools.lru_cache(maxsize=None)
def crop_sampler(scale: tuple[float, float], ratio: tuple[float, float]):
    """``draw(h, w) -> (top, left, height, width)`` for ``RandomResizedCrop(scale, ratio)``.

    The direct sampler when it reproduces the installed torchvision's ``get_params`` (values and
    generator advance, probed once per process on a forked generator over 800 draws), else
    torchvision's own function: either way the PIL path's crops and random stream."""
    fast, reference = _direct_crop(scale, ratio), _torchvision_crop(scale, ratio)
    with torch.random.fork_rng(devices=[]):
        runs = []
        for draw in (reference, fast):
            torch.manual_seed(20261201)
            boxes = [draw(h, w) for _ in range(100) for h, w in _CROP_PROBE_SIZES]
            runs.append((boxes, torch.get_rng_state()))
    (want, want_state), (got, got_state) = runs
    return fast if got == want and torch.equal(got_state, want_state) else reference


def batch_transforms(preprocess_train, preprocess_eval) -> tuple[TrainTransform, EvalTransform] | None:
    """The batched equivalents of a backbone's two PIL transforms, or None when either has a
    step this module does not reproduce exactly (the caller then keeps the PIL path)."""
    train = _train_of(preprocess_train)
    evaluate = _eval_of(preprocess_eval)
    if train is None or evaluate is None:
        return None
    return train, evaluate


_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear"}


def _steps(transform) -> list | None:
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None
    names = [type(s).__name__ for s in steps]
    # open_clip inserts these two around ToTensor; both are no-ops for RGB PIL images
    if names[-3:] != ["MaybeConvertMode", "MaybeToTensor", "Normalize"]:
        if names[-2:] != ["ToTensor", "Normalize"]:
            return None
        return list(steps[:-2]) + [steps[-1]]
    if getattr(steps[-3], "mode", "RGB") != "RGB":
        return None
    return list(steps[:-3]) + [steps[-1]]


def _size_of(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return int(value[0])
    return None


def _interp(step) -> str | None:
    mode = getattr(getattr(step, "interpolation", None), "value", None)
    if mode not in _INTERPOLATIONS or getattr(step, "antialias", True) is not True:
        return None
    return _INTERPOLATIONS[mode]


def _norm(step) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if type(step).__name__ != "Normalize" or getattr(step, "inplace", False):
        return None
    return tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)


def _train_of(transform) -> TrainTransform | None:
    from torchvision.transforms import RandomResizedCrop

    steps = _steps(transform)
    if steps is None or len(steps) != 2 or type(steps[0]) is not RandomResizedCrop:
        return None
    rrc, norm = steps
    size, interp, mean_std = _size_of(list(rrc.size)), _interp(rrc), _norm(norm)
    if size is None or interp is None or mean_std is None:
        return None
    return TrainTransform(size, tuple(rrc.scale), tuple(rrc.ratio), *mean_std, interp)


def _eval_of(transform) -> EvalTransform | None:
    from torchvision.transforms import CenterCrop, Resize

    steps = _steps(transform)
    if steps is None or len(steps) != 3 or type(steps[0]) is not Resize or type(steps[1]) is not CenterCrop:
        return None
    resize, crop, norm = steps
    size = resize.size if isinstance(resize.size, int) else _size_of(resize.size) if len(resize.size) == 1 else None
    crop_size = _size_of(list(crop.size))
    interp, mean_std = _interp(resize), _norm(norm)
    if size is None or crop_size != size or resize.max_size is not None or interp is None or mean_std is None:
        return None
    return EvalTransform(size, *mean_std, interp)
