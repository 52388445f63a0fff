"""What the Engine needs from a model. models/ implements it (LlavaStyleBackend and its
subclasses); the engine never reaches past it into a tokenizer or a transformers model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch


class Backend(Protocol):
    """A multimodal LM with the attention recorder on (engine/recorder.py).

    The encoded image is the backend's own object (the engine only passes it back); its map
    grid can differ per image (native-resolution and tiling models), so the engine asks
    `grid_of(encoded)` for every image instead of reading a constant."""

    pads_to_square: bool  # preprocessing pads to a square (heat maps undo it)
    end_ids: set[int]  # ids that end an answer (the tokenizer's EOS)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), as the model would write it."""

    def decode(self, ids: list[int]) -> str:
        """Text of answer ids, special tokens skipped."""

    def encode(self, image: np.ndarray) -> Any:
        """(H, W, 3) uint8 RGB -> the encoded image (e.g. (N_image, hidden) visual tokens)."""

    def encode_batch(self, images: list[np.ndarray]) -> list[Any]:
        """Per image what encode gives it alone, in one batched encoder call where the model
        allows (a stochastic encoder shares its draws across the batch)."""

    def grid_of(self, visual_tokens: Any) -> tuple[int, int]:
        """(rows, columns) of this encoded image's maps: generate and teacher_force give
        (T, rows * columns) maps, row-major, covering the image as the model saw it."""

    def generate(
        self,
        visual_tokens: Any,
        question: str,
        max_new_tokens: int,
        on_token: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        stop_at_end: bool = True,
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy answer ids (the end token included when emitted) and their maps
        (T, rows * columns). stop_at_end=False always makes max_new_tokens tokens (benchmarks of
        random models)."""

    def generate_batch(
        self,
        prompts: list[tuple[Any, str]],
        max_new_tokens: list[int],
        on_token: list[Callable[[list[int]], None] | None],
        should_stop: list[Callable[[], bool] | None],
        stop_at_end: bool = True,
    ) -> list[tuple[list[int], torch.Tensor] | Exception]:
        """Per (encoded image, question), with its own limit, on_token and should_stop, what
        generate gives it alone, or the exception that ended it (Cancelled, what its on_token
        raised; a failed forward pass ends every prompt in that pass). Prompts are decoded in as
        few passes per step as the model allows (on a memory-bound GPU a step of B rows costs
        about one): LLaVA-style backends decode prompts with as many image tokens together,
        prompts with their own LM inputs (Qwen2.5-VL's positions) one at a time."""

    def warm_up(self, question: str, max_new_tokens: int) -> None:
        """Prepare whatever a first answer to `question` would otherwise build (fixed-shape
        decoders)."""

    def teacher_force(
        self, visual_tokens: Any, question: str, answer_ids: list[int]
    ) -> torch.Tensor:
        """Maps (T, rows * columns) of the given answer ids in one forward pass."""

    def teacher_force_batch(
        self, question: str, sequences: list[tuple[Any, list[int]]]
    ) -> list[torch.Tensor]:
        """(encoded image, answer ids) pairs, the images the same or not, batched into as few
        forward passes as the model allows: per pair what teacher_force gives it alone."""
