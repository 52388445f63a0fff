"""Trackers: carry grounded masks from frame to frame without the LMM.

Every tracker (the Tracker protocol):
- `seed(frame, masks, ids)`: from now on follow these objects, masks[i] (H, W) bool on
  `frame` under the caller's integer id ids[i]. Objects of an earlier seed whose id is not in
  `ids` are forgotten; an id seeded again keeps whatever the tracker remembers of it (SAM 2
  keeps its memory, the new mask becomes one more conditioning frame).
- `track(frame) -> dict[id, Tracked]`: each seeded object on the next frame.
- `memory() -> TrackerMemory`: what it holds (frames, tensor bytes), for the bounded-memory checks.

Frames are (H, W, 3) uint8 RGB, all of one size per tracker (one tracker per camera).
ColourTracker (here) is weight-free, for the CPU demo and the tests; SAM 2 lives in
models/sam2_tracker.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass
class Tracked:
    mask: np.ndarray  # (H, W) bool, at the frame's size; all False when lost
    score: float  # 0..1, the tracker's confidence that the mask is its object
    lost: bool  # the tracker no longer sees the object


@dataclass
class TrackerMemory:
    frames: int  # frames (or frames' features) held
    tensor_bytes: int  # bytes of the arrays and tensors held


class Tracker(Protocol):
    def seed(self, frame: np.ndarray, masks: list[np.ndarray], ids: list[int]) -> None: ...

    def track(self, frame: np.ndarray) -> dict[int, Tracked]: ...

    def memory(self) -> TrackerMemory: ...


def check_seed(frame: np.ndarray, masks: list[np.ndarray], ids: list[int]) -> None:
    """ValueError unless frame is (H, W, 3) uint8, every mask (H, W) and the ids distinct."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {getattr(frame, 'shape', None)}")
    if len(masks) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"need one distinct id per mask, got {len(masks)} masks and ids {ids}")
    for mask in masks:
        if mask.shape != frame.shape[:2]:
            raise ValueError(f"mask {mask.shape} is not at the frame's size {frame.shape[:2]}")


@dataclass
class _ColourObject:
    colour: np.ndarray  # (3,) int, the median colour of the seed mask
    mask: np.ndarray  # (H, W) bool, where it was last seen
    velocity: tuple[int, int]  # (dx, dy) pixels per frame, from the last two positions
    area: int  # the seed mask's pixels: what "all of it" looks like


class ColourTracker:
    """The weight-free tracker, in the spirit of the colour refiner: an object is its seed
    mask's median colour. On each frame, in a window around where it should be now (its last
    mask moved by its last step, widened by `margin` of the image side), the pixels within
    `tolerance` of that colour (per channel, after a 3x3 median) form 8-connected components;
    the object is the union of those touching the predicted mask (so an occluder splitting it
    keeps both halves).

    score: the found area against the seed's, min/max (1: all of it; falls when occluded, cut
    by the border or merged with a touching object of its colour). lost: under `lost_fraction`
    of the seed's area found. Good on flat-coloured objects; a textured object's median colour
    covers only part of it, and two touching objects of one colour merge.
    """

    def __init__(self, tolerance: int = 40, margin: float = 0.05, lost_fraction: float = 0.1):
        if not 0 < tolerance < 256 or not 0.0 <= margin < 1.0 or not 0.0 < lost_fraction < 1.0:
            raise ValueError(
                f"need 0 < tolerance < 256, 0 <= margin < 1, 0 < lost_fraction < 1; got "
                f"{tolerance}, {margin}, {lost_fraction}"
            )
        self.tolerance, self.margin, self.lost_fraction = tolerance, margin, lost_fraction
        self.objects: dict[int, _ColourObject] = {}

    def seed(self, frame, masks, ids):
        check_seed(frame, masks, ids)
        image = cv2.medianBlur(np.ascontiguousarray(frame), 3)
        seeded = {}
        for mask, i in zip(masks, ids):
            if not mask.any():
                raise ValueError(f"the seed mask of {i} is empty")
            old = self.objects.get(i)
            seeded[i] = _ColourObject(
                np.median(image[mask], axis=0).astype(np.int32),
                mask.copy(),
                old.velocity if old else (0, 0),
                int(mask.sum()),
            )
        self.objects = seeded

    def track(self, frame):
        image = cv2.medianBlur(np.ascontiguousarray(frame), 3)
        return {i: self._track_one(image, obj) for i, obj in self.objects.items()}

    def _track_one(self, image: np.ndarray, obj: _ColourObject) -> Tracked:
        height, width = image.shape[:2]
        dx, dy = obj.velocity
        predicted = shift(obj.mask, dx, dy)
        rows, columns = np.nonzero(predicted if predicted.any() else obj.mask)
        pad = round(self.margin * max(height, width)) + max(abs(dx), abs(dy))
        y0, y1 = max(rows.min() - pad, 0), min(rows.max() + 1 + pad, height)
        x0, x1 = max(columns.min() - pad, 0), min(columns.max() + 1 + pad, width)
        window = image[y0:y1, x0:x1].astype(np.int32)
        near = (np.abs(window - obj.colour).max(axis=2) <= self.tolerance).astype(np.uint8)
        _, labels = cv2.connectedComponents(near, connectivity=8)
        touching = np.unique(labels[predicted[y0:y1, x0:x1] & (labels > 0)])
        found = np.zeros((height, width), bool)
        found[y0:y1, x0:x1] = np.isin(labels, touching) & (labels > 0)
        area = int(found.sum())
        if area < self.lost_fraction * obj.area:
            return Tracked(np.zeros((height, width), bool), 0.0, True)
        step = centroid(found) - centroid(obj.mask)
        obj.velocity = (int(round(step[0])), int(round(step[1])))
        obj.mask = found
        return Tracked(found, min(area, obj.area) / max(area, obj.area), False)

    def memory(self):
        return TrackerMemory(0, sum(o.mask.nbytes + o.colour.nbytes for o in self.objects.values()))


def centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) mean pixel of a non-empty mask."""
    rows, columns = np.nonzero(mask)
    return np.array([columns.mean(), rows.mean()])


def shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The mask moved by (dx, dy) pixels; what leaves the image is dropped."""
    height, width = mask.shape
    moved = np.zeros_like(mask)
    moved[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return moved
