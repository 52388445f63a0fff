"""Synthetic scenes for the demo model: coloured shapes on textured backgrounds.

Each scene is an RGB image, a caption of the kind an LMM would write ("a red
circle, a blue star and a green square.") and, for evaluation only, the mask of
every object as it is visible in the image. Training reads images and captions
only; masks never reach the model.

Coordinates are image pixels: H rows, W columns; centres are (x, y).
Pure numpy + OpenCV, deterministic for a given numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Saturated object colours (RGB); backgrounds stay desaturated so no background
# pixel can be mistaken for an object colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
MIN_VISIBLE = 0.6  # an occluded object keeps at least this fraction of its area
BACKGROUND_MAX_SATURATION = 90  # HSV S (0-255) of every background pixel stays below this


@dataclass
class SceneObject:
    colour: str
    shape: str
    rgb: tuple[int, int, int]  # the exact colour painted on the object's pixels
    centre: tuple[int, int]  # (x, y) where the shape was drawn
    radius: int  # pixels, half the shape's extent
    angle: float  # rotation in radians
    mask: np.ndarray  # (H, W) bool, the pixels of this object visible in the image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str  # names every object exactly once, in random order
    objects: list[SceneObject]  # in caption order


def shape_polygon(shape: str, centre: tuple[int, int], radius: int, angle: float) -> np.ndarray:
    """(N, 2) int32 pixel polygon (x, y) of a shape; circles are drawn by OpenCV directly."""
    cx, cy = centre
    if shape == "square":
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        r = np.full(4, radius)
    elif shape == "triangle":
        t = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        r = np.full(3, radius)
    elif shape == "star":
        t = angle - np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    elif shape == "heart":
        # The classic parametric heart, scaled to fit in the radius, point down.
        s = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        hx = 16 * np.sin(s) ** 3
        hy = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        pts = np.stack([hx, hy + 2.5], axis=1) * (radius / 16.5)
        return np.round(pts + (cx, cy)).astype(np.int32)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def draw_shape_mask(
    shape: str, centre: tuple[int, int], radius: int, angle: float, size: int | tuple[int, int]
) -> np.ndarray:
    """(size, size) (or size = (H, W)) bool mask of one whole (unoccluded) shape, clipped to
    the canvas."""
    canvas = np.zeros(size if isinstance(size, tuple) else (size, size), np.uint8)
    if shape == "circle":
        cv2.circle(canvas, centre, radius, 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(canvas, [shape_polygon(shape, centre, radius, angle)], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 desaturated background: a grey gradient, grain, distractor
    strokes, and one faint tint (so its HSV saturation stays below BACKGROUND_MAX_SATURATION)."""
    levels = rng.uniform(60, 210, size=2)  # grey level at the two ends
    direction = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = np.cos(direction) * xs + np.sin(direction) * ys
    ramp = (ramp - ramp.min()) / np.ptp(ramp)  # (size, size) in [0, 1]
    grey = levels[0] + ramp * (levels[1] - levels[0]) + rng.normal(0, 6, size=(size, size))
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(0, 6)):  # faint lines and rings
        canvas[:] = 0
        p = rng.integers(0, size, size=4)
        if rng.random() < 0.5:
            cv2.line(
                canvas, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), 1, int(rng.integers(1, 3))
            )
        else:
            cv2.circle(canvas, (int(p[0]), int(p[1])), int(rng.integers(4, size // 4)), 1, 1)
        grey += canvas * rng.uniform(-35, 35)
    grey = np.clip(grey, 50, 230)
    tint = rng.uniform(-6, 6, size=3)  # spread <= 13 over a level >= 44
    return np.clip(np.round(grey[..., None] + tint), 0, 255).astype(np.uint8)


def caption_for(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """'there is a red circle, an orange star and the green square.' in the objects' order."""
    articles = [rng.choice(["a", "the"]) for _ in objects]
    phrases = [
        f"{'an' if a == 'a' and obj.colour[0] in 'aeiou' else a} {obj.name}"
        for a, obj in zip(articles, objects)
    ]
    if len(phrases) == 1:
        listing = phrases[0]
    else:
        listing = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    lead = rng.choice(["", "there is "])  # no pronoun leads: spaCy would chunk them as phrases
    return f"{lead}{listing}."


def make_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4) -> Scene:
    """One scene with 1..max_objects objects of distinct (colour, shape), each at least
    MIN_VISIBLE visible; objects drawn later occlude earlier ones."""
    if size < 32:
        raise ValueError(f"scene size {size} too small; use at least 32 pixels")
    if not 1 <= max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(
            f"max_objects must be in 1..{len(COLOURS) * len(SHAPES)}, got {max_objects}"
        )
    image = draw_background(rng, size)
    count = int(rng.integers(1, max_objects + 1))
    while True:  # rejection-sample layouts until every object stays visible enough
        kinds = rng.choice(len(COLOURS) * len(SHAPES), size=count, replace=False)
        full_masks, specs = [], []
        for kind in kinds:
            colour = list(COLOURS)[kind // len(SHAPES)]
            shape = SHAPES[kind % len(SHAPES)]
            radius = int(rng.uniform(0.08, 0.17) * size)
            centre = (
                int(rng.integers(radius, size - radius)),
                int(rng.integers(radius, size - radius)),
            )
            angle = float(rng.uniform(-0.4, 0.4))
            full_masks.append(draw_shape_mask(shape, centre, radius, angle, size))
            specs.append((colour, shape, centre, radius, angle))
        visible = [m.copy() for m in full_masks]
        for i in range(count):
            for later in full_masks[i + 1 :]:
                visible[i] &= ~later
        if all(v.sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full_masks)):
            break
    objects = []
    for (colour, shape, centre, radius, angle), mask in zip(specs, visible):
        # Small per-object colour jitter so the model cannot rely on one exact RGB value.
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        image[mask] = rgb
        objects.append(SceneObject(colour, shape, rgb, centre, radius, angle, mask))
    order = rng.permutation(count)  # random caption order: a colour must be found, not a position
    objects = [objects[i] for i in order]
    return Scene(image=image, caption=caption_for(objects, rng), objects=objects)


def make_scenes(count: int, seed: int, size: int = 128, max_objects: int = 4) -> list[Scene]:
    """`count` scenes from one seed; training and evaluation use disjoint seeds."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, max_objects) for _ in range(count)]


def referring_expression(obj: SceneObject) -> str:
    """The refer-mode query for an object; unique in its scene since kinds are distinct."""
    return f"the {obj.name}"
