"""A generated segmentation set: textured shapes on a textured background.

Every sample is a pure function of (seed, index), so a split is reproducible at any size without
files. The background is a near-grey texture, shapes carry saturated textures. Textures are drawn
independently of the class; hues are too with ``hue_jitter=0.5``, so the class has to be read from
the shape's geometry (a ring differs from a circle only by its hole), while a small jitter gives
each class a hue band (a colour prior, as real classes have) — the quickstart setting, which trains
on a CPU in minutes.
"""
from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np

__all__ = ["SHAPE_CLASSES", "paint_shapes", "render_shapes"]

SHAPE_CLASSES = ("background", "circle", "square", "triangle", "cross", "ring")


def _grey(rng: np.random.Generator) -> np.ndarray:
    """A near-grey colour (background palette): grey level U(0.15, 0.85), tint ±0.06."""
    return rng.uniform(0.15, 0.85) + rng.uniform(-0.06, 0.06, 3)


def _vivid(rng: np.random.Generator, hue: float = 0.5, jitter: float = 0.5) -> np.ndarray:
    """A saturated colour (shape palette): hue ``hue`` ± ``jitter`` (0.5: any hue), saturation
    U(0.6, 1), value U(0.5, 1)."""
    h, s, v = (hue + rng.uniform(-jitter, jitter)) % 1.0, rng.uniform(0.6, 1), rng.uniform(0.5, 1)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, colour, contrast: float = 1.0) -> np.ndarray:
    """A (H, W, 3) float texture in [0, 1]: flat, stripes, checker or smooth noise between two
    colours from ``colour(rng)``; the second is pulled towards the first by ``contrast``."""
    c1 = colour(rng)
    c2 = c1 + contrast * (colour(rng) - c1)
    kind = rng.integers(4)
    if kind == 0:  # flat
        t = np.zeros_like(yy)
    elif kind == 1:  # stripes at a random angle
        a, period = rng.uniform(0, math.pi), rng.uniform(3, 10) * size / 64
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == 2:  # checker
        cell = rng.uniform(3, 9) * size / 64
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    else:  # smooth noise: a coarse random grid, bilinearly upsampled
        g = rng.uniform(0, 1, (5, 5))
        gy, gx = yy / max(size - 1, 1) * 4, xx / max(size - 1, 1) * 4
        y0, x0 = np.clip(np.floor(gy).astype(int), 0, 3), np.clip(np.floor(gx).astype(int), 0, 3)
        fy, fx = gy - y0, gx - x0
        t = (g[y0, x0] * (1 - fy) * (1 - fx) + g[y0 + 1, x0] * fy * (1 - fx)
             + g[y0, x0 + 1] * (1 - fy) * fx + g[y0 + 1, x0 + 1] * fy * fx).astype(np.float32)
    return np.clip(c1 * (1 - t[..., None]) + c2 * t[..., None], 0, 1)


def _shape_mask(cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean (H, W) mask of shape ``cls`` centred at (cy, cx) with radius ``r``, rotated by ``angle``."""
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if cls == 1:  # circle
        return u * u + v * v <= r * r
    if cls == 2:  # square (half side 0.8 r)
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if cls == 3:  # equilateral triangle with circumradius 1.3 r (inradius 0.65 r): area close to the others
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + k * 2 * math.pi / 3
            inside &= dx * math.cos(a) + dy * math.sin(a) <= 0.65 * r
        return inside
    if cls == 4:  # cross (arms of half width 0.3 r)
        w = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    if cls == 5:  # ring (hole of radius 0.5 r shows what is below)
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape class {cls}; valid: 1..{len(SHAPE_CLASSES) - 1}")


def _paint_visible(image: np.ndarray, m: np.ndarray, tex: np.ndarray) -> None:
    """Paint ``tex`` into ``image`` (H, W, 3 in [0, 1]) where ``m``, first pushing its colour away from
    what it covers when the two means are close, so every shape stays visible."""
    under = image[m].mean(0) if m.any() else image.mean((0, 1))
    diff = tex[m].mean(0) - under if m.any() else np.zeros(3)
    if np.abs(diff).max() < 0.25:
        tex = np.clip(tex + np.where(under < 0.5, 0.35, -0.35), 0, 1)
    image[m] = tex[m]


def paint_shapes(
    rng: np.random.Generator,
    size: int,
    num_shapes: tuple[int, int],
    draw_class: Callable[[], tuple[int, float]],
    radius: tuple[float, float],
    centre: tuple[float, float] = (0.1, 0.9),
    shape_contrast: float = 1.0,
    background_contrast: float = 1.0,
    hue_jitter: float = 0.5,
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """The one painter of the generated sets: a textured background, then shapes in drawing order
    (a later one occludes what it covers), each kept visible against what it is painted over.

    Args:
        rng: the sample's generator (everything below is drawn from it, in a fixed order).
        size: image side in pixels.
        num_shapes: inclusive range of shapes per image.
        draw_class: draws one shape's (renderer class id in 1..5 of :data:`SHAPE_CLASSES`, hue in [0, 1)).
        radius: shape radius range as a fraction of ``size``.
        centre: range of the shape centres as a fraction of ``size``.
        shape_contrast: texture contrast inside shapes.
        background_contrast: texture contrast of the background.
        hue_jitter: half-width of the hue band around each shape's hue (0.5: any hue).

    Returns:
        ``image`` float (size, size, 3) in [0, 1], the full boolean (size, size) mask of every shape, and
        the class id of every shape, in drawing order.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _texture(rng, yy, xx, size, _grey, background_contrast)
    masks, ids = [], []
    for _ in range(int(rng.integers(num_shapes[0], num_shapes[1] + 1))):
        shape_id, hue = draw_class()
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(*centre, 2) * size
        m = _shape_mask(shape_id, yy, xx, cy, cx, r, rng.uniform(0, 2 * math.pi))
        tex = _texture(rng, yy, xx, size, lambda g: _vivid(g, hue, hue_jitter), shape_contrast)
        _paint_visible(image, m, tex)
        masks.append(m)
        ids.append(shape_id)
    return image, masks, ids


def render_shapes(
    index: int,
    size: int = 64,
    seed: int = 0,
    num_shapes: tuple[int, int] = (1, 4),
    radius: tuple[float, float] = (0.12, 0.3),
    noise: float = 0.04,
    shape_contrast: float = 1.0,
    background_contrast: float = 1.0,
    hue_jitter: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of the set ``seed``: image uint8 (size, size, 3), mask uint8 (size, size)
    with 0 = background and 1..5 = :data:`SHAPE_CLASSES`.

    ``num_shapes``: inclusive range of shapes per image (later ones occlude earlier ones);
    ``radius``: shape radius as a fraction of ``size``; ``noise``: std of additive Gaussian noise;
    ``shape_contrast`` / ``background_contrast``: texture contrast inside shapes / of the background;
    ``hue_jitter``: class k's colours have hue (k−1)/5 ± hue_jitter — 0.5 makes colour carry no
    class information (the class is then in the geometry alone), below 0.1 each class owns a hue
    band, as real classes have typical colours (sky, grass), which makes training much faster.
    """
    rng = np.random.default_rng([seed, index])

    def draw_class() -> tuple[int, float]:
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        return cls, (cls - 1) / (len(SHAPE_CLASSES) - 1)

    image, masks, ids = paint_shapes(rng, size, num_shapes, draw_class, radius, (0.1, 0.9), shape_contrast,
                                     background_contrast, hue_jitter)
    mask = np.zeros((size, size), dtype=np.uint8)
    for m, cls in zip(masks, ids):
        mask[m] = cls
    image = image + rng.normal(0, noise, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask
