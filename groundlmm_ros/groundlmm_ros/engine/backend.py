"""What the Engine needs from a model, and nothing more. models/ implements it
(models/backend.py: Backend); the engine never reaches past it into a tokenizer or a
transformers model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch


class Backend(Protocol):
    """A multimodal LM with the attention recorder on (models/recorder.py).

    The encoded image is the backend's own object (the engine only passes it back); its map
    grid can differ per image (native-resolution and tiling models), so the engine asks
    `grid_of(encoded)` for every image instead of reading a constant."""

    pads_to_square: bool  # preprocessing pads to a square (heat maps undo it)
    end_ids: set[int]  # ids that end an answer (the tokenizer's EOS)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), as the model would write it."""

    def decode(self, ids: list[int]) -> str:
        """Text of answer ids, special tokens skipped."""

    def encode_batch(self, images: list[np.ndarray]) -> list[Any]:
        """(H, W, 3) uint8 RGB images -> per image its encoded form (e.g. (N_image, hidden) visual
        tokens), the same as alone, in one batched encoder call where the model allows (a
        stochastic encoder shares its draws across the batch)."""

    def grid_of(self, visual_tokens: Any) -> tuple[int, int]:
        """(rows, columns) of this encoded image's maps: generate_batch and teacher_force_batch
        give (T, rows * columns) maps, row-major, covering the image as the model saw it."""

    def generate_batch(
        self,
        prompts: list[tuple[Any, str]],
        max_new_tokens: list[int],
        on_token: list[Callable[[list[int]], None] | None],
        should_stop: list[Callable[[], bool] | None],
        stop_at_end: bool = True,
    ) -> list[tuple[list[int], torch.Tensor] | Exception]:
        """Per (encoded image, question), with its own limit, on_token(ids so far) and
        should_stop, its greedy answer alone: (ids, the end token included when emitted; maps
        (T, rows * columns)), or the exception that ended it (Cancelled, what its on_token
        raised; a failed forward pass ends every prompt). All prompts decode together, one
        forward pass per token (on a memory-bound GPU a step of B rows costs about one).
        stop_at_end=False always makes max_new_tokens tokens (benchmarks of random models)."""

    def warm_up(self, question: str, max_new_tokens: int, batch_sizes: list[int]) -> float:
        """Prepare whatever the first answers to `question` in batches of `batch_sizes` would
        otherwise build (the decoder's fixed-shape buffers, CUDA graphs, compiled steps).
        -> the seconds it took."""

    def teacher_force_batch(
        self, question: str, sequences: list[tuple[Any, list[int]]]
    ) -> list[torch.Tensor]:
        """(encoded image, answer ids) pairs, the images the same or not, in one teacher-forced
        pass: per pair the maps (T, rows * columns) of its answer ids, as alone."""
