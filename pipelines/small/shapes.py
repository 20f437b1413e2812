"""A procedural captioned dataset of coloured shapes, deterministic from a seed.

Every sample is a pure function of ``(seed, index)``: coloured shapes (circle,
square, triangle, star) at random positions, sizes and small rotations on a
flat, gradient, striped, checkered or noisy background of one named colour,
with a caption naming them left to right::

    "a red circle on a green background"
    "a red circle and a blue square on a green background"

The video variant moves each shape along a straight line across the frames
and names the dominant direction::

    "a red circle moving left and a blue star moving up on a white background"

Shapes are drawn as anti-aliased masks (rendered at ``SUPERSAMPLE`` times the
size, box-filtered down); a shape's colour always differs from the background's,
and two shapes never share the same (shape, colour) pair.

``ShapesDataset`` / ``ShapesVideoDataset`` are ``torch.utils.data.Dataset``
views (``index -> dict(pixels in [-1, 1], caption, coverage, labels)``; ``coverage``: how much of each
pixel the shapes cover, in [0, 1]); ``labels`` feed
the shape/colour classifier (:mod:`diffaccel.pipelines.small.evaluate`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "COLOR_NAMES",
    "DIRECTIONS",
    "VOCAB",
    "ShapeSpec",
    "Sample",
    "render_image",
    "render_video",
    "sample_spec",
    "caption_for",
    "parse_caption",
    "ShapesDataset",
    "ShapesVideoDataset",
    "pair_index",
]

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
}
COLOR_NAMES = tuple(COLORS)
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND_STYLES = ("flat", "gradient", "stripes", "checker", "noise")
# every word a caption can use (the small models' word-level vocabulary)
VOCAB = ("a", "and", "on", "background", "moving") + SHAPES + COLOR_NAMES + DIRECTIONS
SUPERSAMPLE = 4


def pair_index(shape: str, color: str) -> int:
    """Index of a (shape, colour) pair in the classifier's ``len(SHAPES) * len(COLORS)`` outputs."""
    return SHAPES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: centre and radius as fractions of the image side, rotation in degrees;
    ``(dx, dy)``: displacement over the whole clip (video only; 0 for images)."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float
    angle: float = 0.0
    dx: float = 0.0
    dy: float = 0.0

    @property
    def direction(self) -> str:
        if abs(self.dx) >= abs(self.dy):
            return "right" if self.dx > 0 else "left"
        return "down" if self.dy > 0 else "up"


@dataclass
class Sample:
    """A rendered sample: ``pixels`` ``[H, W, 3]`` (image) or ``[T, H, W, 3]`` (video) uint8; ``coverage``
    ``[H, W]`` or ``[T, H, W]`` float32 in [0, 1]: how much of each pixel the shapes cover."""

    pixels: np.ndarray
    caption: str
    shapes: tuple
    background: str
    style: str
    coverage: np.ndarray


def caption_for(shapes, background: str, video: bool = False) -> str:
    parts = []
    for s in shapes:
        text = f"a {s.color} {s.shape}"
        if video:
            text += f" moving {s.direction}"
        parts.append(text)
    return " and ".join(parts) + f" on a {background} background"


def still_caption(caption: str) -> str:
    """``caption`` without its motion words (``"a red circle moving left on a ..."`` -> ``"a red circle on a
    ..."``); other words and the empty caption are kept as they are."""
    return re.sub(rf" moving (?:{'|'.join(DIRECTIONS)})\b", "", caption)


def parse_caption(caption: str):
    """``([(shape, colour), ...], background)`` named by a caption of this dataset's grammar
    (``ValueError`` otherwise).  Direction words are accepted and ignored."""
    words = caption.lower().replace(",", " ").split()
    if len(words) < 7 or words[-1] != "background":
        raise ValueError(f"caption {caption!r} does not end with 'on a <colour> background'")
    background = words[-2]
    if background not in COLORS or words[-4:-2] != ["on", "a"]:
        raise ValueError(f"caption {caption!r}: expected 'on a <colour> background' with a colour in {COLOR_NAMES}")
    body = " ".join(words[:-4])
    pairs = []
    for part in body.split(" and "):
        w = part.split()
        if len(w) not in (3, 5) or w[0] != "a" or w[1] not in COLORS or w[2] not in SHAPES:
            raise ValueError(f"caption {caption!r}: expected 'a <colour> <shape>' parts, got {part!r}")
        if len(w) == 5 and (w[3] != "moving" or w[4] not in DIRECTIONS):
            raise ValueError(f"caption {caption!r}: expected 'moving <direction>', got {part!r}")
        pairs.append((w[2], w[1]))
    return pairs, background


def _rng(seed: int, index: int, stream: int = 0):
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, stream])


def sample_spec(seed: int, index: int, max_shapes: int = 2, video: bool = False):
    """The shapes and background of sample ``index``: ``(shapes, background, style)``, shapes sorted
    left to right (by their mean x position for videos)."""
    rng = _rng(seed, index)
    background = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    style = BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    n = int(rng.integers(1, max_shapes + 1))
    shapes = []
    used = set()
    for _ in range(n):
        for _attempt in range(20):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
            if color == background or (shape, color) in used:
                continue
            r = float(rng.uniform(0.16, 0.28)) if n == 1 else float(rng.uniform(0.13, 0.21))
            angle = float(rng.uniform(-15, 15))
            if video:
                # start and end both inside the frame; a clear dominant direction
                travel = float(rng.uniform(0.25, min(0.45, 1 - 2 * r - 0.02)))
                direction = DIRECTIONS[rng.integers(4)]
                ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
                dx, dy = ux * travel, uy * travel
                lo_x, hi_x = r + max(0.0, -dx), 1 - r - max(0.0, dx)
                lo_y, hi_y = r + max(0.0, -dy), 1 - r - max(0.0, dy)
            else:
                dx = dy = 0.0
                lo_x, hi_x, lo_y, hi_y = r, 1 - r, r, 1 - r
            cx, cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            spec = ShapeSpec(shape, color, cx, cy, r, angle, dx, dy)
            # keep shapes apart (centre distance at least the larger radius plus a bit)
            if all(math.hypot(cx + dx / 2 - o.cx - o.dx / 2, cy + dy / 2 - o.cy - o.dy / 2) > 0.9 * (r + o.r)
                   for o in shapes):
                shapes.append(spec)
                used.add((shape, color))
                break
    shapes.sort(key=lambda s: s.cx + s.dx / 2)
    return tuple(shapes), background, style


def _shape_polygon(spec: ShapeSpec, cx: float, cy: float, r: float):
    """Vertices (in pixels) of a polygonal shape centred at ``(cx, cy)`` with radius ``r``."""
    a0 = math.radians(spec.angle)
    if spec.shape == "square":
        # half side r * 0.85: about the same area as the circle of radius r
        h = r * 0.85 * math.sqrt(2)
        angles = [a0 + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + h * math.cos(a), cy + h * math.sin(a)) for a in angles]
    if spec.shape == "triangle":
        rr = r * 1.15
        angles = [a0 - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a) + 0.15 * r) for a in angles]
    if spec.shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.1 if k % 2 == 0 else r * 0.45
            a = a0 - math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown polygon shape {spec.shape!r}")


def _shape_mask(spec: ShapeSpec, size: int, t: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` in [0, 1] of ``spec`` at time ``t`` in [0, 1]."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = (spec.cx + t * spec.dx) * big, (spec.cy + t * spec.dy) * big, spec.r * big
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(spec, cx, cy, r), fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng, background: str, style: str, size: int) -> np.ndarray:
    """``[size, size, 3]`` float32 in [0, 255]: shades of ``background``'s colour."""
    base = np.asarray(COLORS[background], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if style == "flat":
        shade = np.full((size, size), float(rng.uniform(0.85, 1.05)), np.float32)
    elif style == "gradient":
        a = float(rng.uniform(0, 2 * math.pi))
        ramp = (math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)) / 0.71  # about [-1, 1]
        shade = 0.9 + 0.18 * ramp
    elif style == "stripes":
        period = float(rng.uniform(0.15, 0.35))
        a = float(rng.uniform(0, math.pi))
        phase = (math.cos(a) * xx + math.sin(a) * yy) / period
        shade = np.where(np.floor(phase) % 2 == 0, 1.0, 0.8).astype(np.float32)
    elif style == "checker":
        cells = int(rng.integers(3, 7))
        shade = np.where((np.floor(xx * cells * 0.999) + np.floor(yy * cells * 0.999)) % 2 == 0, 1.0, 0.82)
    elif style == "noise":
        coarse = rng.uniform(0.8, 1.05, size=(4, 4)).astype(np.float32)
        shade = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    else:
        raise ValueError(f"unknown background style {style!r}")
    img = base[None, None, :] * np.asarray(shade, np.float32)[..., None]
    # white backgrounds get darker shades so that texture shows; everything stays in range
    return np.clip(img, 0, 255)


def _compose(rng_bg, shapes, background, style, size, t):
    """``(pixels [size, size, 3] uint8, coverage [size, size] float32)`` of the frame at time ``t``."""
    img = _background(rng_bg, background, style, size)
    cover = np.zeros((size, size), np.float32)
    for s in shapes:
        m = _shape_mask(s, size, t)
        img = img * (1 - m[..., None]) + np.asarray(COLORS[s.color], np.float32) * m[..., None]
        cover = np.maximum(cover, m)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cover


def render_image(seed: int, index: int, size: int = 32, max_shapes: int = 2) -> Sample:
    """Sample ``index`` of the image dataset with ``seed``: ``pixels`` ``[size, size, 3]`` uint8."""
    shapes, background, style = sample_spec(seed, index, max_shapes)
    pixels, cover = _compose(_rng(seed, index, 1), shapes, background, style, size, 0.0)
    return Sample(pixels, caption_for(shapes, background), shapes, background, style, cover)


def render_video(seed: int, index: int, size: int = 32, frames: int = 8, max_shapes: int = 2) -> Sample:
    """Sample ``index`` of the video dataset: ``pixels`` ``[frames, size, size, 3]`` uint8; each shape
    moves linearly from its start (frame 0) to its end (last frame)."""
    shapes, background, style = sample_spec(seed, index, max_shapes, video=True)
    # the background is the same in every frame (same generator stream)
    out = [_compose(_rng(seed, index, 1), shapes, background, style, size, f / max(frames - 1, 1))
           for f in range(frames)]
    return Sample(np.stack([p for p, _ in out]), caption_for(shapes, background, video=True), shapes, background, style,
                  np.stack([c for _, c in out]))


def _labels(sample: Sample):
    import torch

    pairs = torch.zeros(len(SHAPES) * len(COLOR_NAMES))
    for s in sample.shapes:
        pairs[pair_index(s.shape, s.color)] = 1.0
    return dict(pairs=pairs, background=torch.tensor(COLOR_NAMES.index(sample.background)))


def _coverage(sample: Sample):
    """The shapes' coverage as a ``[1, H, W]`` (video: ``[1, T, H, W]``) tensor, channels first as ``pixels``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(sample.coverage)).unsqueeze(0)


def _to_tensor(pixels: np.ndarray):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)  # [..., 3, H, W]


class _Base:
    def __init__(self, seed: int = 0, length: int = 100_000, size: int = 32, max_shapes: int = 2):
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        if not 1 <= max_shapes <= 3:
            raise ValueError(f"max_shapes must be 1, 2 or 3, got {max_shapes}")
        self.seed, self.length, self.size, self.max_shapes = int(seed), int(length), int(size), int(max_shapes)

    def __len__(self):
        return self.length

    def _check(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)


class ShapesDataset(_Base):
    """``dataset[i] = dict(pixels [3, size, size] in [-1, 1], caption, coverage [1, size, size], pairs,
    background)``."""

    def sample(self, index: int) -> Sample:
        self._check(index)
        return render_image(self.seed, index, self.size, self.max_shapes)

    def __getitem__(self, index: int):
        s = self.sample(index)
        return dict(pixels=_to_tensor(s.pixels), caption=s.caption, coverage=_coverage(s), **_labels(s))


class ShapesVideoDataset(_Base):
    """``dataset[i] = dict(pixels [3, frames, size, size] in [-1, 1], caption, coverage [1, frames, size, size],
    pairs, background)`` (channels first, as ``WanTransformer3DModel`` takes them)."""

    def __init__(self, seed: int = 0, length: int = 100_000, size: int = 32, frames: int = 8, max_shapes: int = 2):
        super().__init__(seed, length, size, max_shapes)
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = int(frames)

    def sample(self, index: int) -> Sample:
        self._check(index)
        return render_video(self.seed, index, self.size, self.frames, self.max_shapes)

    def __getitem__(self, index: int):
        s = self.sample(index)
        return dict(pixels=_to_tensor(s.pixels).movedim(-3, 0), caption=s.caption, coverage=_coverage(s), **_labels(s))
