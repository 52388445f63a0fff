"""The LLaVA v1 family's prompts (LLaVA-1.5, DiffLMM): pixels padded to a square as the
checkpoint was trained, a vision encoder's visual tokens on a fixed grid in place of "<image>"
in the LLaVA v1 conversation template. A Backend (models/backend.py) is built around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.decoder import Prompt

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's conversation templates for one user turn (llava/conversation.py in LLaVA and in the
# reference code): roles "USER"/"ASSISTANT", separators " " and "</s>"; only the system line
# differs.
# Vicuna v1.5 and LLaVA-1.5 (and so DiffLMM) were TRAINED with vicuna_v1; the paper's GCG scripts
# (the reference's aas/infer_attn.py, --conv-mode default "llava_v1") PROMPT with llava_v1.
CONVERSATIONS = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
}
PAPER_CONVERSATION = "llava_v1"


def llava_v1_prompt(question: str, conversation: str = PAPER_CONVERSATION) -> str:
    """One user turn of a LLaVA v1 conversation template with the image first, ending where
    the assistant's answer begins: "{system} USER: <image>\n{question} ASSISTANT:"."""
    if conversation not in CONVERSATIONS:
        raise ValueError(
            f"conversation must be one of {', '.join(CONVERSATIONS)}, got {conversation!r}"
        )
    return f"{CONVERSATIONS[conversation]} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


# OpenAI CLIP's statistics: CLIPImageProcessor's defaults and what llava-hf ships.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's images became pixel values in training, so inference must repeat it:
    pad to square with `pad_color`, bicubic resize, then (x / 255 - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_color: tuple[int, int, int]

    @classmethod
    def llava(cls, mean=CLIP_MEAN, std=CLIP_STD) -> "Preprocessing":
        """LLaVA's `process_images` with image_aspect_ratio "pad": expand2square fills with
        int(255 * mean) of the image processor ((122, 116, 104) for CLIP's mean)."""
        return cls(tuple(mean), tuple(std), tuple(int(255 * m) for m in mean))

    def pixel_values(self, image: np.ndarray, size: int) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32."""
        return to_pixel_values(pad_to_square(image, self.pad_color), size, self.mean, self.std)


# The released LLaVA-1.5 and DiffLMM weights were trained on these pixels. (DiffLMM's code asks
# CLIPImageProcessor for mean = std = 0.5, but through keywords the class does not take, so the
# processor kept CLIP's statistics: the reference's llava/model/multimodal_encoder/sd_encoder.py.)
CLIP_PREPROCESSING = Preprocessing.llava()


def pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3), S = max(H, W), the image centred (LLaVA's expand2square:
    offset (S - H) // 2 rows or (S - W) // 2 columns); heatmap.py undoes exactly this."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    return square


def to_pixel_values(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32, normalised.

    After pad-to-square, CLIPImageProcessor's shortest-edge resize + centre crop is a plain
    bicubic resize to size x size (PIL, as the processor does)."""
    resized = np.asarray(
        Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    normalised = (resized / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1).unsqueeze(0).contiguous()


class VisionEncoder(Protocol):
    """What turns a LLaVA-style model's square pixels into visual tokens."""

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N_image, hidden)."""


class LlavaPrompts:
    """LLaVA-style prompts: square-padded pixels through `encoder`, visual tokens on a fixed
    grid in place of "<image>" in the LLaVA v1 template `conversation`.

    embeddings: the LM's input embeddings (nn.Embedding), which embed the template's text."""

    pads_to_square = True

    def __init__(
        self,
        encoder: VisionEncoder,
        tokenizer,
        embeddings,
        *,
        grid: tuple[int, int],
        image_size: int,
        preprocessing: Preprocessing = CLIP_PREPROCESSING,
        conversation: str = "",
    ):
        conversation = conversation or PAPER_CONVERSATION
        llava_v1_prompt("", conversation)  # an unknown template fails here, not at the first query
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.grid = grid
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.conversation = conversation

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    # -- image -> visual tokens ------------------------------------------------

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, image_size, image_size) on the model's device."""
        return self.preprocessing.pixel_values(image, self.image_size).to(self.device)

    def grid_of(self, visual_tokens) -> tuple[int, int]:
        """Every image gets the same square grid here."""
        return self.grid

    @torch.inference_mode()
    def encode_batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Every image the same size after preprocessing: one encode_image call for all."""
        pixels = torch.cat([self.preprocess(image) for image in images])
        tokens = self.encoder.encode_image(pixels)
        expected = (len(images), self.grid[0] * self.grid[1])
        if tuple(tokens.shape[:2]) != expected:
            raise ValueError(
                f"encode_image gave visual tokens {tuple(tokens.shape)} for {len(images)} images, "
                f"the grid {self.grid} needs {expected[1]} each"
            )
        return list(tokens)

    # -- prompt ------------------------------------------------------------------

    def prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after "<image>", the way LLaVA's tokenizer_image_token
        does it: each chunk tokenized on its own, the BOS kept only on the first."""
        if IMAGE_PLACEHOLDER in question:
            raise InputError(
                f"the question contains {IMAGE_PLACEHOLDER!r}, which the prompt keeps for the image"
            )
        before, after = llava_v1_prompt(question, self.conversation).split(IMAGE_PLACEHOLDER)
        ids_before = self.tokenizer(before).input_ids
        ids_after = self.tokenizer(after).input_ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids_after[:1] == [bos]:
            ids_after = ids_after[1:]
        return ids_before, ids_after

    def prompt(
        self, visual_tokens: torch.Tensor, question: str, answer_ids: list[int] = ()
    ) -> Prompt:
        ids_before, ids_after = self.prompt_ids(question)
        weight = self.embeddings.weight
        embeds = torch.cat(
            [
                self.embeddings(torch.tensor(ids_before, device=weight.device)),
                visual_tokens.to(weight.device, weight.dtype),
                self.embeddings(torch.tensor(ids_after + list(answer_ids), device=weight.device)),
            ]
        )
        length = embeds.shape[0]
        return Prompt(
            embeds.unsqueeze(0),
            torch.arange(length, device=self.device)[None],
            length,
            len(ids_before),
            visual_tokens.shape[0],
        )
