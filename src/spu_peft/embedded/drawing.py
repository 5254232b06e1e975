"""Drawing the rendered pretraining domains: letters in matplotlib's DejaVu fonts and geometric shapes with PIL.

Each image is drawn at 4x on a canvas and box-filtered down to 28x28 grey: white anti-aliased strokes on black,
scaled, rotated and shifted at random like MNIST's digits. A class is drawn from its index and a seeded generator.
"""

from __future__ import annotations

import functools
import math
import string
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

IMAGE_SIZE = 28
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased strokes like scanned digits
_CANVAS = IMAGE_SIZE * _SUPERSAMPLE


SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "heart",
    "hexagon",
    "arrow",
    "crescent",
    "spiral",
)

_LETTER_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
)
_FONT_RENDER_SIZE = 96


# -------------------------------------------------------------------------------------------- letters


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), _FONT_RENDER_SIZE)


@functools.cache
def _glyph(char: str, font_name: str) -> PILImage.Image:
    """The glyph cropped to its ink: rendering it once per font keeps data generation fast."""
    size = 2 * _FONT_RENDER_SIZE
    canvas = PILImage.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((size // 2, size // 2), char, fill=255, font=_font(font_name), anchor="mm")
    return canvas.crop(canvas.getbbox())


def _place(ink: PILImage.Image, rng: np.random.Generator, rotation: float) -> np.ndarray:
    """Scale, rotate and shift a high-resolution ink image into a 28x28 frame, MNIST-like.

    One affine resampling to a 4x canvas, then a box filter down to 28x28: anti-aliased and fast.
    """
    scale = rng.uniform(15.0, 22.0) * _SUPERSAMPLE / max(ink.size)  # longest side 15-22 px (MNIST: 20)
    angle = math.radians(rng.uniform(-rotation, rotation))
    out_x, out_y = _CANVAS / 2 + rng.uniform(-2.0, 2.0, size=2) * _SUPERSAMPLE
    in_x, in_y = ink.size[0] / 2, ink.size[1] / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # PIL wants the inverse map: canvas pixel -> ink pixel.
    inverse = (cos, sin, in_x - cos * out_x - sin * out_y, -sin, cos, in_y + sin * out_x - cos * out_y)
    frame = ink.transform((_CANVAS, _CANVAS), PILImage.Transform.AFFINE, inverse, resample=PILImage.Resampling.BILINEAR)
    return _downsample(frame, rng)


def _downsample(frame: PILImage.Image, rng: np.random.Generator) -> np.ndarray:
    """Box-filter the supersampled canvas to 28x28 with a random ink brightness."""
    small = frame.resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) * rng.uniform(0.8, 1.0)).round().astype(np.uint8)


def render_letter(index: int, rng: np.random.Generator) -> np.ndarray:
    font_name = _LETTER_FONTS[rng.integers(len(_LETTER_FONTS))]
    return _place(_glyph(string.ascii_uppercase[index], font_name), rng, rotation=15.0)


# --------------------------------------------------------------------------------------------- shapes


def _regular_polygon(n: int, inner: float | None = None, phase: float = math.pi / 2) -> np.ndarray:
    """Vertices of a regular polygon (or a star when ``inner`` is given) on the unit circle."""
    if inner is None:
        angles = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    angles = phase + math.pi * np.arange(2 * n) / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


_CROSS = np.array(
    [[-0.3, 1], [0.3, 1], [0.3, 0.3], [1, 0.3], [1, -0.3], [0.3, -0.3], [0.3, -1], [-0.3, -1], [-0.3, -0.3]]
    + [[-1, -0.3], [-1, 0.3], [-0.3, 0.3]]
)
_ARROW = np.array([[-1, 0.22], [0.2, 0.22], [0.2, 0.6], [1, 0], [0.2, -0.6], [0.2, -0.22], [-1, -0.22]])


def _shape_layers(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """A shape as (polygon in unit coordinates, fill) layers painted in order; y points up."""
    circle = _regular_polygon(64)
    if name == "circle":
        return [(circle, 255)]
    if name == "ring":
        return [(circle, 255), (circle * rng.uniform(0.55, 0.72), 0)]
    if name == "crescent":
        offset = np.array([rng.uniform(0.35, 0.55), rng.uniform(0.1, 0.25)])
        return [(circle, 255), (circle * rng.uniform(0.85, 1.0) + offset, 0)]
    polygons = {
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.85,
        "triangle": _regular_polygon(3) + np.array([0, -0.2]),
        "star": _regular_polygon(5, inner=0.42),
        "cross": _CROSS,
        "diamond": np.array([[0, 1], [0.62, 0], [0, -1], [-0.62, 0]]),
        "heart": _heart(),
        "hexagon": _regular_polygon(6, phase=0.0),
        "arrow": _ARROW,
    }
    return [(polygons[name].astype(np.float64), 255)]


def _to_canvas(points: np.ndarray, transform: np.ndarray, offset: np.ndarray) -> list[tuple[float, float]]:
    xy = points @ transform.T + offset
    return [(float(x), float(_CANVAS - y)) for x, y in xy]


def _random_transform(rng: np.random.Generator, rotation: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotation, uneven scale and shift mapping unit coordinates to supersampled canvas pixels."""
    angle = math.radians(rng.uniform(-rotation, rotation))
    half = rng.uniform(7.0, 11.0) * _SUPERSAMPLE  # half of the shape's extent (MNIST box: 10)
    aspect = rng.uniform(0.85, 1.15)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    transform = rot @ np.diag([half * aspect, half / aspect])
    offset = _CANVAS / 2 + rng.uniform(-2.0, 2.0, size=2) * _SUPERSAMPLE
    return transform, offset


def _render_spiral(draw: ImageDraw.ImageDraw, transform: np.ndarray, offset: np.ndarray, rng) -> None:
    turns = rng.uniform(2.2, 3.0)
    t = np.linspace(0, 1, 120)
    angle = 2 * math.pi * turns * t + rng.uniform(0, 2 * math.pi)
    pts = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    width = int(rng.uniform(1.6, 2.6) * _SUPERSAMPLE)
    draw.line(_to_canvas(pts, transform, offset), fill=255, width=width)


def render_shape(index: int, rng: np.random.Generator) -> np.ndarray:
    name = SHAPE_CLASSES[index]
    frame = PILImage.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(frame)
    # Squares and crosses turned by 45 degrees become diamonds and letter X: keep rotations small.
    transform, offset = _random_transform(rng, rotation=15.0)
    if name == "spiral":
        _render_spiral(draw, transform, offset, rng)
    else:
        for polygon, fill in _shape_layers(name, rng):
            draw.polygon(_to_canvas(polygon, transform, offset), fill=fill)
    return _downsample(frame, rng)
