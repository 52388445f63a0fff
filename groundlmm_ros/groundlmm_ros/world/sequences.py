"""Synthetic sequences for tracking: the demo model's shapes moving over a still background.

A Mover is one shape with a straight path (pixels per frame) that either bounces off the
image's border (stays in view) or passes through it (leaves, or enters from outside).
Movers drawn later occlude earlier ones. Every frame comes with each mover's true visible
mask (empty when it is hidden or out of view), in mover order, so a tracker's output can be
scored frame by frame.

Frames are rendered on demand (Sequence.frame(t)): 1,000 frames at 640 x 480 need not sit in
memory. Deterministic for a seed: the background, the movers' colour jitter and the per-frame
sensor grain all come from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groundlmm_ros.world.scenes import COLOURS, SHAPES, draw_background, draw_shape_mask


@dataclass
class Mover:
    colour: str
    shape: str
    radius: int  # pixels
    start: tuple[float, float]  # (x, y) centre at frame 0; may lie outside the image
    velocity: tuple[float, float]  # pixels per frame
    spin: float = 0.0  # radians per frame
    bounce: bool = True  # reflect at the border; False: the path runs out of (or into) view

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def centre(self, t: int, height: int, width: int) -> tuple[int, int]:
        """(x, y) at frame t: the straight path, folded back into the image when bouncing."""
        position = []
        for start, speed, side in zip(self.start, self.velocity, (width, height)):
            p = start + speed * t
            if self.bounce:
                # Reflect between radius and side - radius (a triangle wave of period 2 * span).
                span = side - 2 * self.radius
                p = np.abs((p - self.radius) % (2 * span) - span)
                p = self.radius + span - p
            position.append(int(round(p)))
        return position[0], position[1]


@dataclass
class SequenceFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: list[np.ndarray]  # per mover, (H, W) bool: its pixels visible in this frame


class Sequence:
    """movers over one background of size (height, width); frame(t) renders frame t."""

    def __init__(
        self,
        movers: list[Mover],
        size: tuple[int, int] = (128, 128),
        seed: int = 0,
        grain: float = 3.0,
    ):
        unknown = [m.name for m in movers if m.colour not in COLOURS or m.shape not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colour or shape in {unknown}; known: {COLOURS}, {SHAPES}")
        self.movers = movers
        self.size = size
        self.seed = seed
        self.grain = grain
        rng = np.random.default_rng(seed)
        height, width = size
        # A still camera: one background, the square draw cropped to the frame.
        self.background = draw_background(rng, max(size))[:height, :width]
        # The same small colour jitter as the still scenes, once per mover.
        self.colours = [
            tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[m.colour])
            for m in movers
        ]

    def frame(self, t: int) -> SequenceFrame:
        height, width = self.size
        whole = [
            draw_shape_mask(m.shape, m.centre(t, height, width), m.radius, m.spin * t, self.size)
            for m in self.movers
        ]
        image = self.background.astype(np.float32)
        for mask, colour in zip(whole, self.colours):
            image[mask] = colour
        # Sensor grain, new every frame (seeded by the frame's number).
        image += np.random.default_rng((self.seed, t)).normal(0, self.grain, image.shape)
        visible = [m.copy() for m in whole]
        for i in range(len(whole)):
            for later in whole[i + 1 :]:
                visible[i] &= ~later
        return SequenceFrame(np.clip(np.round(image), 0, 255).astype(np.uint8), visible)


def random_movers(
    rng: np.random.Generator, count: int, size: tuple[int, int] = (128, 128), speed: float = 2.0
) -> list[Mover]:
    """`count` bouncing movers of distinct (colour, shape), radius 10-15 % of the short side,
    speed up to `speed` px per frame (scaled with the short side over 128) in any direction:
    their paths cross, so they occlude each other."""
    height, width = size
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=count, replace=False)
    movers = []
    for kind in kinds:
        radius = int(rng.uniform(0.10, 0.15) * min(size))
        direction = rng.uniform(0, 2 * np.pi)
        magnitude = rng.uniform(0.5, 1.0) * speed * min(size) / 128
        movers.append(
            Mover(
                colour=list(COLOURS)[kind // len(SHAPES)],
                shape=SHAPES[kind % len(SHAPES)],
                radius=radius,
                start=(rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)),
                velocity=(magnitude * np.cos(direction), magnitude * np.sin(direction)),
                spin=float(rng.uniform(-0.03, 0.03)),
            )
        )
    return movers
