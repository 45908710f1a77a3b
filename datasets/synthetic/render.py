"""Procedural renderer of one (attribute, object) image, in numpy and PIL.

Every image is a pure function of ``(attr, obj, image_size, rng)``. The object is drawn as a
polygon mask in its own unit coordinates (``u, v`` in about [-1, 1], ``v`` pointing down) and
placed with a random position, scale and rotation; shading, patterns and state effects are
computed in object coordinates so they rotate with the object.

Primitive diversity is built in on purpose: each attribute has a *different rendering per
object family* (``wet`` is a glossy highlight on a geometric shape, water droplets on a fruit,
a puddle under an artifact, dark soaked patches on fabric), and several attributes change the
object's silhouette (``broken`` splits or chips it, ``old``/``burnt`` fray or hole fabric,
``frozen`` grows icicles). One centroid per primitive is therefore a poor model of this world.

Nuisances: background colour, gradient and clutter (including saturated distractor colours),
position, scale, rotation, per-instance shape jitter, occluders, colour jitter and pixel noise.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import DEFAULT_WORLD, World

SUPERSAMPLE = 2  # draw at 2x and downsample with a box filter: cheap anti-aliasing

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "green": (0.15, 0.68, 0.20),
    "blue": (0.15, 0.32, 0.90),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.56, 0.18, 0.72),
    "orange": (1.00, 0.55, 0.08),
}

# Muted "natural" colours an object has when its attribute is not a colour. They are kept far
# less saturated than COLOURS so a pattern or state image is not mistaken for a colour label.
NATURAL_COLOURS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "geometric": ((0.62, 0.62, 0.62), (0.74, 0.70, 0.62), (0.52, 0.56, 0.60)),
    "organic": ((0.66, 0.58, 0.42), (0.55, 0.56, 0.40), (0.70, 0.62, 0.52)),
    "artifact": ((0.68, 0.70, 0.72), (0.60, 0.52, 0.44), (0.78, 0.78, 0.74)),
    "fabric": ((0.88, 0.85, 0.78), (0.78, 0.78, 0.80), (0.84, 0.80, 0.72)),
}


# ---------------------------------------------------------------------------------------------
# Object silhouettes in unit coordinates: a list of (polygon, keep) operations applied in order
# (keep=False cuts a hole), plus detail strokes (polyline, width) drawn dark on top.
# ---------------------------------------------------------------------------------------------


def _ellipse(cx, cy, rx, ry, n=36, a0=0.0, a1=2 * math.pi):
    t = np.linspace(a0, a1, n, endpoint=a1 - a0 < 2 * math.pi - 1e-6)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0, y0, x1, y1):
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _shape(obj: str, rng: np.random.Generator):
    """Return (ops, strokes) for one instance of ``obj`` with per-instance jitter."""
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731 - short local helper
    ops: list[tuple[np.ndarray, bool]] = []
    strokes: list[tuple[np.ndarray, float]] = []
    if obj == "circle":
        ops.append((_ellipse(0, 0, 0.95, 0.95 * j(0.85, 1.1)), True))
    elif obj == "square":
        a = j(0.8, 1.2)
        ops.append((_rect(-0.8 * a, -0.8 / a, 0.8 * a, 0.8 / a), True))
    elif obj == "triangle":
        ops.append((np.array([(j(-0.3, 0.3), -1.0), (-0.95, 0.75), (0.95, 0.75)]), True))
    elif obj == "hexagon":
        t = np.arange(6) * math.pi / 3
        ops.append((np.stack([0.95 * np.cos(t), 0.95 * np.sin(t)], 1), True))
    elif obj == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, j(0.38, 0.5))
        ops.append((np.stack([r * np.cos(t), r * np.sin(t)], 1), True))
    elif obj == "apple":
        ops.append((_ellipse(0, 0.1, 0.9, 0.82 * j(0.9, 1.05)), True))
        ops.append((_ellipse(0, -0.72, 0.22, 0.14), False))
        ops.append((_rect(-0.05, -1.05, 0.05, -0.62), True))
        ops.append((_ellipse(0.22, -0.92, 0.18, 0.07), True))
    elif obj == "leaf":
        w = j(0.38, 0.55)
        t = np.linspace(-1, 1, 24)
        top = np.stack([t * 0.9, -w * (1 - t**2)], 1)
        bottom = np.stack([t[::-1] * 0.9, w * (1 - t[::-1] ** 2)], 1)
        ops.append((np.concatenate([top, bottom]), True))
        ops.append((_rect(0.85, -0.04, 1.15, 0.04), True))
        strokes.append((np.array([(-0.85, 0.0), (0.9, 0.0)]), 0.05))
        for x in (-0.4, 0.0, 0.4):
            strokes.append((np.array([(x, 0.0), (x - 0.25, -w * 0.6)]), 0.035))
            strokes.append((np.array([(x, 0.0), (x - 0.25, w * 0.6)]), 0.035))
    elif obj == "mushroom":
        cap_h = j(0.55, 0.75)
        ops.append((_ellipse(0, -0.05, 1.0, cap_h, n=24, a0=math.pi, a1=2 * math.pi), True))
        ops.append((np.array([(-0.22, -0.05), (0.22, -0.05), (0.3, 0.9), (-0.3, 0.9)]), True))
        strokes.append((np.array([(-0.9, -0.05), (0.9, -0.05)]), 0.05))
    elif obj == "fish":
        ops.append((_ellipse(-0.15, 0, 0.75, 0.42 * j(0.85, 1.15)), True))
        ops.append((np.array([(0.45, 0), (1.0, -0.45), (1.0, 0.45)]), True))
        strokes.append((_ellipse(-0.58, -0.1, 0.05, 0.05, n=8), 0.06))
        strokes.append((np.array([(-0.3, -0.3), (-0.25, 0.0), (-0.3, 0.3)]), 0.04))
    elif obj == "cup":
        ops.append((_ellipse(0.62, 0.0, 0.36, 0.36), True))
        ops.append((_ellipse(0.62, 0.0, 0.19, 0.2), False))
        ops.append((np.array([(-0.62, -0.7), (0.6, -0.7), (0.45, 0.8), (-0.47, 0.8)]), True))
    elif obj == "bottle":
        w = j(0.38, 0.5)
        ops.append((_rect(-w, -0.2, w, 1.0), True))
        ops.append((np.array([(-w, -0.2), (w, -0.2), (0.17, -0.55), (-0.17, -0.55)]), True))
        ops.append((_rect(-0.17, -0.9, 0.17, -0.5), True))
        ops.append((_rect(-0.22, -1.05, 0.22, -0.86), True))
    elif obj == "key":
        ops.append((_ellipse(-0.6, 0, 0.4, 0.4), True))
        ops.append((_rect(-0.25, -0.09, 1.0, 0.09), True))
        ops.append((_rect(0.55, 0.05, 0.68, j(0.28, 0.4)), True))
        ops.append((_rect(0.8, 0.05, 0.95, j(0.22, 0.34)), True))
        ops.append((_ellipse(-0.6, 0, 0.17, 0.17), False))
    elif obj == "flag":
        ops.append((_rect(-0.98, -1.0, -0.86, 1.0), True))
        amp, ph = j(0.04, 0.12), j(0, 2 * math.pi)
        x = np.linspace(-0.86, 0.95, 16)
        top = np.stack([x, -0.95 + amp * np.sin(3 * x + ph)], 1)
        bottom = np.stack([x[::-1], 0.15 + amp * np.sin(3 * x[::-1] + ph)], 1)
        ops.append((np.concatenate([top, bottom]), True))
    elif obj == "shirt":
        s = j(0.85, 1.0)
        pts = [(-0.3, -0.85), (-0.12, -0.68), (0.12, -0.68), (0.3, -0.85), (0.95, -0.55),
               (0.75, -0.15), (0.5, -0.3), (0.5, 0.95), (-0.5, 0.95), (-0.5, -0.3),
               (-0.75, -0.15), (-0.95, -0.55)]
        ops.append((np.array(pts) * np.array([s, 1.0]), True))
    else:  # pragma: no cover - the world vocabulary is closed
        raise ValueError(f"no silhouette for object {obj!r}; add one to render._shape")
    return ops, strokes


# ---------------------------------------------------------------------------------------------
# Helpers on float32 canvases
# ---------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    """Placement of the object: canvas size, centre, radius (px) and rotation."""

    size: int
    cx: float
    cy: float
    radius: float
    angle: float

    def to_canvas(self, pts: np.ndarray) -> list[tuple[float, float]]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = self.cx + self.radius * (c * pts[:, 0] - s * pts[:, 1])
        y = self.cy + self.radius * (s * pts[:, 0] + c * pts[:, 1])
        return list(zip(x.tolist(), y.tolist()))

    def object_coords(self) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32) + 0.5
        dx, dy = (xx - self.cx) / self.radius, (yy - self.cy) / self.radius
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * dx + s * dy, -s * dx + c * dy


def _draw_mask(size: int, polys: list[tuple[list, bool]]) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for pts, keep in polys:
        draw.polygon(pts, fill=255 if keep else 0)
    return np.asarray(img, dtype=np.float32) / 255.0


def _lowfreq_noise(size: int, rng: np.random.Generator, grid: int = 6, aspect=(1, 1)) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    g = rng.random((grid * aspect[0], grid * aspect[1])).astype(np.float32)
    img = Image.fromarray((g * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _morph(mask: np.ndarray, k: int, grow: bool) -> np.ndarray:
    img = Image.fromarray((mask * 255).astype(np.uint8))
    img = img.filter(ImageFilter.MaxFilter(k) if grow else ImageFilter.MinFilter(k))
    return np.asarray(img, dtype=np.float32) / 255.0


def _blend(dst: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return dst * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def _desaturate(rgb: np.ndarray, amount: float) -> np.ndarray:
    grey = rgb.mean(axis=-1, keepdims=True)
    return rgb * (1 - amount) + grey * amount


def _random_points_in(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask > 0.5)
    if len(xs) == 0:
        return np.zeros((0, 2))
    idx = rng.integers(0, len(xs), size=n)
    return np.stack([xs[idx], ys[idx]], 1).astype(np.float32)


def _disks(size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of disks as a float mask (image coordinates)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for (x, y), r in zip(centres.tolist(), radii.tolist()):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.85)
    base = np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    phi = rng.uniform(0, 2 * math.pi)
    grad = 1 + rng.uniform(-0.35, 0.35) * (xx * math.cos(phi) + yy * math.sin(phi))
    bg = base * grad[..., None] * (0.9 + 0.2 * _lowfreq_noise(size, rng, 5))[..., None]
    img = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):  # clutter, sometimes in saturated colours
        col = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.2, 0.95))
        col = tuple(int(c * 255) for c in col)
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.12) * size
        kind = rng.integers(0, 3)
        if kind == 0:
            x2, y2 = x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r
            draw.line([x, y, x2, y2], fill=col, width=max(1, int(r / 3)))
        elif kind == 1:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:
            draw.rectangle([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=col)
    return np.asarray(img, dtype=np.float32) / 255.0


def _base_colour(attr: str, family: str, rng: np.random.Generator) -> np.ndarray:
    """The object's fill colour. Colour attributes are rendered differently per object family."""
    if attr in COLOURS:
        h, s, v = colorsys.rgb_to_hsv(*COLOURS[attr])
        h = (h + rng.uniform(-0.025, 0.025)) % 1.0
        s, v = s * rng.uniform(0.85, 1.0), v * rng.uniform(0.85, 1.05)
        col = np.array(colorsys.hsv_to_rgb(h, s, min(v, 1.0)), dtype=np.float32)
        if family == "organic":  # natural, darker and browner
            col = 0.72 * col + 0.28 * np.array([0.35, 0.22, 0.1], dtype=np.float32)
        elif family == "artifact":  # metallic: desaturated, lighter
            col = _desaturate(col, 0.3) * 1.05
        elif family == "fabric":  # dyed cloth: pastel
            col = 0.68 * col + 0.32
        return np.clip(col, 0, 1)
    palette = NATURAL_COLOURS[family]
    col = np.array(palette[int(rng.integers(0, len(palette)))], dtype=np.float32)
    return np.clip(col * rng.uniform(0.85, 1.12) + rng.uniform(-0.04, 0.04, 3), 0, 1)


def _shading(family: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-family material look, in object coordinates (an object-family cue)."""
    if family == "geometric":
        return np.full_like(u, 1.0)
    if family == "organic":  # round, lit from the upper left
        d = np.sqrt((u + 0.35) ** 2 + (v + 0.35) ** 2)
        return np.clip(1.2 - 0.45 * d, 0.55, 1.2)
    if family == "artifact":  # brushed metal / glaze bands
        ph = rng.uniform(0, 2 * math.pi)
        return 0.85 + 0.25 * np.sin(u * 3.5 + ph)
    # fabric: fine weave and soft folds
    return 0.92 + 0.05 * (np.sin(u * 45) * np.sin(v * 45)) + 0.08 * np.sin(v * 4 + rng.uniform(0, 6))


def _pattern(attr: str, family: str, u: np.ndarray, v: np.ndarray, rng) -> np.ndarray:
    """0/1 pattern layer; the same pattern word looks different per object family."""
    ph = rng.uniform(0, 1)
    frac = lambda x: x - np.floor(x)  # noqa: E731
    if attr == "striped":
        if family == "geometric":
            return frac(v * 2.0 + ph) < 0.5
        if family == "artifact":
            return frac((u + v) * 4.5 + ph) < 0.3
        return frac(u * 3 + 0.25 * np.sin(v * 6) + ph) < 0.45
    if attr == "dotted":
        if family == "fabric":  # irregular polka dots
            return np.zeros_like(u, dtype=bool)  # drawn as random disks by the caller
        f, r = (2.0, 0.17) if family == "geometric" else (4.5, 0.08)
        du, dv = frac(u * f / 2 + ph) - 0.5, frac(v * f / 2 + ph) - 0.5
        return du**2 + dv**2 < (r * f / 2) ** 2
    if attr == "checkered":
        if family == "fabric":  # diagonal check
            a, b = (u + v) * 2.2 + ph, (u - v) * 2.2
        else:
            f = 2.0 if family == "geometric" else 4.5
            a, b = u * f + ph, v * f
        return (np.floor(a) + np.floor(b)) % 2 == 0
    if attr == "zigzag":
        f = {"geometric": 2.0, "artifact": 4.5, "fabric": 3.0}[family]
        w = 0.5 if family == "geometric" else 0.3
        return frac(v * f + np.abs(frac(u * f) - 0.5) + ph) < w
    raise ValueError(f"{attr!r} is not a pattern attribute")


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------


def render(attr: str, obj: str, image_size: int, rng: np.random.Generator,
           world: World = DEFAULT_WORLD) -> np.ndarray:
    """Render one ``attr obj`` image as uint8 ``[image_size, image_size, 3]``."""
    size = image_size * SUPERSAMPLE
    afam, ofam = world.attr_family[attr], world.obj_family[obj]
    bg = _background(size, rng)

    # --- placement and silhouette --------------------------------------------------------------
    radius = size * rng.uniform(0.27, 0.41)
    if attr == "old" and ofam == "organic":  # shrivelled
        radius *= 0.85
    free = (0.8 * radius, size - 0.8 * radius)
    upright = ofam != "geometric"
    angle = rng.uniform(-0.6, 0.6) if upright else rng.uniform(-math.pi, math.pi)
    frame = _Frame(size, rng.uniform(*free), rng.uniform(*free), radius, angle)
    ops, strokes = _shape(obj, rng)
    mask = _draw_mask(size, [(frame.to_canvas(p), keep) for p, keep in ops])
    u, v = frame.object_coords()
    unit = radius  # pixels per object unit

    # --- fill -----------------------------------------------------------------------------------
    col = _base_colour(attr, ofam, rng)
    fg = col * _shading(ofam, u, v, rng)[..., None]
    if afam == "pattern":
        ink = np.array([0.08, 0.08, 0.12] if rng.random() < 0.7 else [0.97, 0.97, 0.95], np.float32)
        if attr == "dotted" and ofam == "fabric":
            pts = _random_points_in(mask, int(rng.integers(7, 13)), rng)
            pat = _disks(size, pts, np.full(len(pts), 0.09 * unit))
        else:
            pat = _pattern(attr, ofam, u, v, rng).astype(np.float32)
        fg = _blend(fg, ink, pat * 0.9)

    extra_bg: list[tuple[np.ndarray, tuple]] = []  # (alpha, colour) painted on the background
    overlay: list[tuple[np.ndarray, tuple]] = []  # painted over everything
    if afam == "state":
        fg, mask = _state(attr, ofam, fg, mask, u, v, frame, rng, extra_bg, overlay)

    # --- composite ------------------------------------------------------------------------------
    for alpha, colour in extra_bg:
        bg = _blend(bg, colour, alpha)
    out = _blend(bg, (0, 0, 0), mask) + fg * mask[..., None]
    if strokes:
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        for pts, w in strokes:
            draw.line(frame.to_canvas(pts), fill=255, width=max(1, int(w * unit)))
        alpha = np.asarray(img, dtype=np.float32) / 255.0 * mask
        out = _blend(out, (0.12, 0.1, 0.08), alpha * 0.8)
    for alpha, colour in overlay:
        out = _blend(out, colour, alpha)

    # --- nuisances ------------------------------------------------------------------------------
    if rng.random() < 0.3:  # occluder near the object
        img = Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        occ_col = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4),
                                                                  rng.uniform(0.2, 0.8)))
        phi, dist = rng.uniform(0, 2 * math.pi), radius * rng.uniform(0.6, 1.1)
        ox, oy = frame.cx + dist * math.cos(phi), frame.cy + dist * math.sin(phi)
        w, h = radius * rng.uniform(0.3, 0.6), radius * rng.uniform(0.3, 0.6)
        if rng.random() < 0.5:
            draw.rectangle([ox - w, oy - h, ox + w, oy + h], fill=occ_col)
        else:
            draw.ellipse([ox - w, oy - h, ox + w, oy + h], fill=occ_col)
        out = np.asarray(img, dtype=np.float32) / 255.0
    gain = rng.uniform(0.9, 1.1, 3).astype(np.float32) * rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.85, 1.15)
    mean = out.mean()
    out = (out - mean) * contrast + mean
    out = out * gain + rng.normal(0, 0.02, out.shape).astype(np.float32)
    img = Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
    img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def _state(attr, ofam, fg, mask, u, v, frame: _Frame, rng, extra_bg, overlay):
    """State attributes: one rendering per object family; some change the silhouette."""
    size, unit = frame.size, frame.radius
    k = max(3, (size // 32) | 1)
    if attr == "wet":
        if ofam == "geometric":  # dark, bluish, glossy highlight
            fg = fg * 0.72 + np.array([0.0, 0.04, 0.12], np.float32)
            hl = np.exp(-(((u + 0.35) / 0.38) ** 2 + ((v + 0.4) / 0.16) ** 2) * 2)
            fg = fg + hl[..., None] * (1 - fg) * 0.9
        elif ofam == "organic":  # water droplets
            fg = fg * 0.9
            pts = _random_points_in(mask, int(rng.integers(5, 10)), rng)
            radii = rng.uniform(0.06, 0.11, len(pts)) * unit
            ring = _disks(size, pts, radii)
            core = _disks(size, pts, radii * 0.55)
            fg = _blend(fg, (0.2, 0.25, 0.3), (ring - core) * 0.6)
            fg = _blend(fg, (0.88, 0.94, 1.0), core * 0.85)
        elif ofam == "artifact":  # puddle underneath and running streaks
            ys, xs = np.nonzero(mask > 0.5)
            bottom = ys.max() if len(ys) else frame.cy + unit
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            puddle = ((xx - frame.cx) / (1.3 * unit)) ** 2 + ((yy - bottom) / (0.22 * unit)) ** 2 < 1
            extra_bg.append((puddle.astype(np.float32) * 0.8, (0.32, 0.42, 0.58)))
            streak = (np.abs(np.sin(u * 9 + rng.uniform(0, 6))) > 0.93).astype(np.float32)
            fg = _blend(fg * 0.85, (0.85, 0.92, 1.0), streak * 0.7)
        else:  # fabric: dark soaked blotches and drops falling
            blot = np.clip((_lowfreq_noise(size, rng, 5) - 0.45) * 5, 0, 1)
            fg = fg * (1 - 0.5 * blot[..., None])
            ys, xs = np.nonzero(mask > 0.5)
            if len(ys):
                n = int(rng.integers(3, 7))
                drops = np.stack([rng.uniform(xs.min(), xs.max(), n),
                                  ys.max() + rng.uniform(0.1, 0.5, n) * unit], 1)
                extra_bg.append((_disks(size, drops, np.full(n, 0.06 * unit)), (0.3, 0.45, 0.75)))
    elif attr == "old":
        if ofam == "geometric":  # faded with cracks
            fg = _desaturate(fg, 0.6) * 0.85 + np.array([0.08, 0.06, 0.0], np.float32)
            img = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(2, 4))):
                p = rng.uniform(-0.6, 0.6, 2)
                pts = [p]
                for _ in range(4):
                    p = p + rng.uniform(-0.35, 0.35, 2)
                    pts.append(p)
                draw.line(frame.to_canvas(np.array(pts)), fill=255, width=max(1, int(0.04 * unit)))
            cracks = np.asarray(img, dtype=np.float32) / 255.0
            fg = _blend(fg, (0.15, 0.12, 0.1), cracks * 0.9)
        elif ofam == "organic":  # shrivelled with brown spots
            fg = 0.7 * fg + 0.3 * np.array([0.55, 0.42, 0.2], np.float32)
            pts = _random_points_in(mask, int(rng.integers(4, 9)), rng)
            spots = _disks(size, pts, rng.uniform(0.07, 0.17, len(pts)) * unit)
            fg = _blend(fg, (0.33, 0.2, 0.08), spots * 0.85)
        elif ofam == "artifact":  # rust speckle
            fg = _desaturate(fg, 0.4)
            blob = _lowfreq_noise(size, rng, 6) > 0.55
            speck = (rng.random(mask.shape) < 0.45) & blob
            fg = _blend(fg, (0.62, 0.3, 0.1), speck.astype(np.float32) * 0.9)
        else:  # fabric: faded, frayed edge and moth holes
            fg = fg * 0.6 + 0.4 * np.array([0.95, 0.93, 0.88], np.float32)
            edge = mask - _morph(mask, k, grow=False)
            pts = _random_points_in(edge, int(rng.integers(10, 18)), rng)
            holes = _random_points_in(_morph(mask, 3 * k, grow=False), int(rng.integers(1, 4)), rng)
            cut = _disks(size, np.concatenate([pts, holes]),
                         np.concatenate([rng.uniform(0.05, 0.1, len(pts)), np.full(len(holes), 0.07)]) * unit)
            mask = mask * (1 - cut)
    elif attr == "broken":
        if ofam == "geometric":  # split along a random line, the halves pushed apart
            phi = rng.uniform(0, math.pi)
            side = (u * math.cos(phi) + v * math.sin(phi)) > rng.uniform(-0.2, 0.2)
            part = mask * side
            # the displacement, in pixels, along the cut's normal in canvas coordinates
            nx, ny = math.cos(phi + frame.angle), math.sin(phi + frame.angle)
            d = rng.uniform(0.15, 0.28) * unit
            dx, dy = int(round(nx * d)), int(round(ny * d + 0.05 * unit))
            moved_mask = np.roll(np.roll(part, dy, 0), dx, 1)
            moved_fg = np.roll(np.roll(fg, dy, 0), dx, 1)
            rest = mask * (~side)
            fg = np.where(moved_mask[..., None] > 0.5, moved_fg, fg)
            mask = np.maximum(rest, moved_mask)
        else:  # artifact: a chipped-out wedge and a crack
            a = rng.uniform(0, 2 * math.pi)
            tip = np.array([0.15 * math.cos(a + 2), 0.15 * math.sin(a + 2)])
            wedge = np.array([tip, [1.4 * math.cos(a - 0.35), 1.4 * math.sin(a - 0.35)],
                              [1.4 * math.cos(a + 0.35), 1.4 * math.sin(a + 0.35)]])
            cut = _draw_mask(size, [(frame.to_canvas(wedge), True)])
            mask = mask * (1 - cut)
            pts = [tip]
            p = tip
            for _ in range(4):
                p = p + np.array([-math.cos(a), -math.sin(a)]) * 0.22 + rng.uniform(-0.12, 0.12, 2)
                pts.append(p)
            img = Image.new("L", (size, size), 0)
            ImageDraw.Draw(img).line(frame.to_canvas(np.array(pts)), fill=255, width=max(1, int(0.05 * unit)))
            fg = _blend(fg, (0.1, 0.08, 0.08), np.asarray(img, dtype=np.float32) / 255.0)
    elif attr == "frozen":
        ice = np.array([0.78, 0.9, 1.0], np.float32)
        if ofam == "geometric":  # icy tint and frost crystals
            fg = fg * 0.5 + ice * 0.5
            img = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(img)
            for x, y in _random_points_in(mask, int(rng.integers(5, 10)), rng).tolist():
                r = rng.uniform(0.06, 0.12) * unit
                for t in range(3):
                    ang = t * math.pi / 3 + rng.uniform(0, 0.5)
                    draw.line([x - r * math.cos(ang), y - r * math.sin(ang),
                               x + r * math.cos(ang), y + r * math.sin(ang)], fill=255, width=max(1, size // 64))
            overlay.append((np.asarray(img, dtype=np.float32) / 255.0 * 0.9, (0.97, 0.99, 1.0)))
        elif ofam == "organic":  # white frosted rim and rime speckles
            fg = fg * 0.7 + ice * 0.3
            rim = mask - _morph(mask, k + 2, grow=False)
            speck = (rng.random(mask.shape) < 0.12).astype(np.float32)
            fg = _blend(fg, (0.96, 0.98, 1.0), np.clip(rim * 0.9 + speck * 0.6, 0, 1))
        else:  # artifact: icicles hanging below, bluish tint
            fg = fg * 0.7 + ice * 0.3
            ys, xs = np.nonzero(mask > 0.5)
            if len(xs):
                img = Image.new("L", (size, size), 0)
                draw = ImageDraw.Draw(img)
                for x in rng.uniform(xs.min(), xs.max(), int(rng.integers(3, 7))).tolist():
                    col = ys[np.abs(xs - x) < 1.5]
                    if len(col) == 0:
                        continue
                    y = float(col.max())
                    w, h = rng.uniform(0.04, 0.08) * unit, rng.uniform(0.2, 0.45) * unit
                    draw.polygon([(x - w, y - 1), (x + w, y - 1), (x, y + h)], fill=255)
                icicles = np.asarray(img, dtype=np.float32) / 255.0
                fg = np.where(icicles[..., None] > mask[..., None], np.array([0.85, 0.95, 1.0], np.float32), fg)
                mask = np.maximum(mask, icicles)
    elif attr == "burnt":
        char = (0.07, 0.05, 0.04)
        if ofam == "organic":  # charred patches
            fg = fg * 0.7 * np.array([1.0, 0.85, 0.7], np.float32)
            patches = np.clip((_lowfreq_noise(size, rng, 5) - 0.5) * 6, 0, 1)
            fg = _blend(fg, char, patches * 0.95)
        elif ofam == "artifact":  # soot streaks and smoke above
            streaks = _lowfreq_noise(size, rng, 4, aspect=(1, 4))
            fg = fg * (1 - 0.75 * np.clip((streaks - 0.35) * 2.5, 0, 1))[..., None]
            ys, xs = np.nonzero(mask > 0.5)
            if len(ys):
                n = int(rng.integers(2, 5))
                puffs = np.stack([frame.cx + rng.uniform(-0.5, 0.5, n) * unit,
                                  ys.min() - rng.uniform(0.05, 0.4, n) * unit], 1)
                smoke = _disks(size, puffs, rng.uniform(0.12, 0.22, n) * unit)
                overlay.append((smoke * 0.55, (0.35, 0.35, 0.36)))
        else:  # fabric: blackened edges and burn holes with dark rims
            edge = mask - _morph(mask, 2 * k - 1, grow=False)
            holes_c = _random_points_in(_morph(mask, 3 * k, grow=False), int(rng.integers(1, 4)), rng)
            r = rng.uniform(0.07, 0.13, len(holes_c)) * unit
            rims = _disks(size, holes_c, r * 1.6)
            fg = _blend(fg, char, np.clip(edge + rims, 0, 1) * 0.9)
            mask = mask * (1 - _disks(size, holes_c, r))
    return fg, mask
