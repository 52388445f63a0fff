"""Plain types of the engine, no rclpy. Results hold numpy only; an Answer's maps are the
model's torch tensor, still on its device.

Coordinates are image pixels of the input image (H rows, W columns);
points are (x, y) = (column, row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MODES = ("describe", "refer")
# Most answer tokens a query generates where neither the model's preset nor the caller says:
# a robot re-grounding a standing query needs its answer in a fraction of the time of the
# paper's 512, and the objects a planner asks about are named early.
MAX_NEW_TOKENS = 64
# The paper generates its answers (GCG, and RES's "Describe the ..." answers) with up to 512 new
# tokens.
PAPER_ANSWER_TOKENS = 512


class InputError(ValueError):
    """Bad input (image, query, mode) refused before any model work."""


class Cancelled(Exception):
    """Generation was stopped by the caller's should_stop() between tokens."""


@dataclass
class GroundedPhrase:
    text: str  # the noun phrase (describe) or the whole expression (refer)
    char_start: int  # [char_start, char_end) of the phrase in Grounding.answer
    char_end: int
    # answer tokens whose maps were combined (indices into Grounding.token_ids)
    token_indices: list[int]
    heatmap: np.ndarray  # (H, W) float32, the combined map upsampled to image pixels
    point: tuple[int, int]  # (x, y) argmax of heatmap, the refiner's point prompt
    mask: np.ndarray  # (H, W) bool
    score: float  # refiner's mask quality (SAM's predicted IoU); 1.0 without one
    bbox: tuple[int, int, int, int]  # (x, y, width, height) tight box of mask; zeros if empty


@dataclass
class Grounding:
    query: str
    mode: str  # one of MODES
    answer: str  # the answer as decoded, unstripped (refer: the expression itself)
    token_ids: list[int]  # the answer's token ids
    phrases: list[GroundedPhrase]
    image_size: tuple[int, int]  # (H, W)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


@dataclass
class Request:
    """One query of a batched step (Engine.ground_batch); the fields are ground()'s arguments."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    query: str
    mode: str = "describe"
    on_token: Callable[[str, int], None] | None = None  # partial answer, tokens so far
    should_stop: Callable[[], bool] | None = None  # checked between tokens: Cancelled
    max_new_tokens: int | None = None


@dataclass
class Answer:
    """The model's greedy answer to one query, before its phrases are grounded."""

    token_ids: list[int]  # without the end token
    text: str  # the full decode of token_ids, unstripped
    spans: list[tuple[int, int]]  # each token's [start, end) in text (phrases.token_spans)
    # (T, rows * columns) one map per generated token, the end token's included when emitted,
    # on the model's device; rows * columns is `grid`.
    maps: torch.Tensor
    grid: tuple[int, int]  # (rows, columns) of the encoded image's token grid
