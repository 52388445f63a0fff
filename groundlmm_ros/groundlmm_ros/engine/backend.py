"""What the Engine needs from a model. models/ implements it (LlavaStyleBackend and its
subclasses); the engine never reaches past it into a tokenizer or a transformers model."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch


class Backend(Protocol):
    """A multimodal LM with the attention recorder on (engine/recorder.py)."""

    grid: tuple[int, int]             # (rows, columns) of the visual tokens, e.g. (24, 24)
    pads_to_square: bool              # preprocessing pads to a square (heat maps undo it)
    end_ids: set[int]                 # ids that end an answer (the tokenizer's EOS)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), as the model would write it."""

    def decode(self, ids: list[int]) -> str:
        """Text of answer ids, special tokens skipped."""

    def encode(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (N_image, hidden) visual tokens."""

    def generate(self, visual_tokens: torch.Tensor, question: str, max_new_tokens: int,
                 on_token: Callable[[list[int]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 stop_at_end: bool = True) -> tuple[list[int], torch.Tensor]:
        """Greedy answer ids (the end token included when emitted) and their maps (T, N_image).
        stop_at_end=False always makes max_new_tokens tokens (benchmarks of random models)."""

    def warm_up(self, question: str, max_new_tokens: int) -> None:
        """Prepare whatever a first answer to `question` would otherwise build (fixed-shape decoders)."""

    def teacher_force(self, visual_tokens: torch.Tensor, question: str, answer_ids: list[int]) -> torch.Tensor:
        """Maps (T, N_image) of the given answer ids in one forward pass."""
