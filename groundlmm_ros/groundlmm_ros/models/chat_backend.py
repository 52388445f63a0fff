"""Prompts for models that come with a transformers processor and chat template (Qwen2.5-VL,
LLaVA-NeXT, InternVL): the model's own resizing or tiling, image-token expansion and prompt,
so the model sees what it was trained on.

An image is encoded once (`encode`): the processor expands the model's one image placeholder
into that image's run of image tokens, and the vision tower gives their embeddings. A prompt
is the chat template's text tokenized as the processor tokenizes it, the placeholder replaced
by that run. The recorder reads the run's columns; the family's ImageLayout says which of them
form the map (row-major) and the grid's shape, which differs from image to image.
`chat_template_backend` composes a Backend (models/backend.py) of these prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.decoder import Prompt
from groundlmm_ros.models.recorder import RECORDING_ATTENTION


@dataclass
class EncodedImage:
    # the processor's token run for this image (placeholder expanded)
    image_ids: list[int]
    # (n_image, hidden) LM embeddings of the run's image-token positions
    features: torch.Tensor
    # the processor's image tensors (pixel_values, image_grid_thw, image_sizes ...)
    inputs: dict
    # (rows, columns) of the map
    grid: tuple[int, int]
    # indices into the n_image tokens that form the map, row-major; None: all
    grid_columns: torch.Tensor | None


class ImageLayout(Protocol):
    """A chat model family's vision tower and how its image tokens make a map."""

    def image_kwargs(self) -> dict:
        """The processor's image options this family sets."""

    def image_features(self, inputs: dict) -> torch.Tensor:
        """The processor's image tensors -> (n_image, hidden) embeddings in sequence order."""

    def grid(
        self, inputs: dict, n_image: int, image_size: tuple[int, int]
    ) -> tuple[tuple[int, int], torch.Tensor | None]:
        """(grid, grid_columns) of this image: which image tokens form the map, as what grid."""

    def positions(self, ids: list[int], visual_tokens: EncodedImage) -> tuple[torch.Tensor, int]:
        """The prompt's position ids (1, S) (or (3, 1, S)) and the first generated token's."""


def sequential_positions(ids: list[int], device) -> tuple[torch.Tensor, int]:
    """One position per token: what every family but Qwen2.5-VL's 3D rotary positions uses."""
    return torch.arange(len(ids), device=device)[None], len(ids)


def chat_template_backend(
    model, processor, layout: ImageLayout, *, conversation: str = "", compile: bool = False
) -> Backend:
    """model: a transformers *ForConditionalGeneration with `config.image_token_id`; processor: its
    processor (image processor, tokenizer, chat template); layout: its family's ImageLayout.
    Only the text model records.

    conversation: none; these models prompt with their own chat template, so a LLaVA v1
    template is refused. compile: the decoder's (models/backend.py)."""
    if conversation:
        raise ValueError(
            f"{type(model).__name__} prompts with its own chat template; conversation "
            f"{conversation!r} is a LLaVA v1 template"
        )
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else processor.tokenizer.eos_token_id
    prompts = ChatTemplatePrompts(
        processor, layout, model.get_input_embeddings(), model.config.image_token_id
    )
    return Backend(
        model,
        processor.tokenizer,
        prompts,
        end_ids=set(eos) if isinstance(eos, (list, tuple)) else {eos},
        text_attention={"text_config": RECORDING_ATTENTION},
        compile=compile,
    )


class ChatTemplatePrompts:
    """A processor's chat template and image-token expansion, the family's `layout` for the
    vision tower and map; embeddings: the LM's input embeddings."""

    pads_to_square = False

    def __init__(self, processor, layout: ImageLayout, embeddings, image_token_id: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.layout = layout
        self.embeddings = embeddings
        self.image_token_id = image_token_id

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    # -- image ------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> EncodedImage:
        inputs = self.processor(
            images=[Image.fromarray(image)],
            text=[self.processor.image_token],
            add_special_tokens=False,
            return_tensors="pt",
            **self.layout.image_kwargs(),
        )
        image_ids = inputs.pop("input_ids")[0].tolist()
        inputs = {
            k: v.to(self.device) if torch.is_tensor(v) else v
            for k, v in inputs.items()
            if k not in ("attention_mask", "mm_token_type_ids")
        }
        features = self.layout.image_features(inputs)
        n_image = image_ids.count(self.image_token_id)
        if features.shape[0] != n_image:
            raise ValueError(
                f"the vision tower gave {features.shape[0]} embeddings for {n_image} image tokens"
            )
        grid, columns = self.layout.grid(inputs, n_image, image.shape[:2])
        return EncodedImage(image_ids, features, inputs, grid, columns)

    def encode_batch(self, images: list[np.ndarray]) -> list[EncodedImage]:
        """One image at a time: each has its own size and token count."""
        return [self.encode(image) for image in images]

    def grid_of(self, visual_tokens: EncodedImage) -> tuple[int, int]:
        return visual_tokens.grid

    # -- prompt -----------------------------------------------------------------

    def chat_text(self, question: str) -> str:
        """One user turn, the image first, ending where the assistant's answer begins."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def prompt_token_ids(self, visual_tokens: EncodedImage, question: str) -> list[int]:
        """The chat text tokenized as the processor tokenizes it, its one placeholder expanded."""
        ids = self.tokenizer(self.chat_text(question)).input_ids
        if ids.count(self.image_token_id) > 1:  # the template places one: the others are the user's
            raise InputError(
                "the question contains the model's image token "
                f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}, which the prompt "
                "keeps for the image"
            )
        if ids.count(self.image_token_id) != 1:
            raise ValueError(
                f"the chat template gave {ids.count(self.image_token_id)} image placeholders, not 1"
            )
        at = ids.index(self.image_token_id)
        return ids[:at] + visual_tokens.image_ids + ids[at + 1 :]

    def prompt(self, visual_tokens: EncodedImage, question: str, answer_ids=()) -> Prompt:
        ids = self.prompt_token_ids(visual_tokens, question) + list(answer_ids)
        is_image = torch.tensor(ids, device=self.device) == self.image_token_id
        positions = is_image.nonzero()[:, 0]
        start, n_image = int(positions[0]), len(positions)
        if int(positions[-1]) != start + n_image - 1:
            raise ValueError("the image tokens are not one contiguous run")
        embeds = self.embeddings(torch.tensor(ids, device=self.device))
        weight = self.embeddings.weight
        embeds[start : start + n_image] = visual_tokens.features.to(weight.device, weight.dtype)
        positions, next_position = self.layout.positions(ids, visual_tokens)
        return Prompt(
            embeds.unsqueeze(0),
            positions,
            next_position,
            start,
            n_image,
            visual_tokens.grid_columns,
        )
