"""Qwen2.5-VL on transformers' Qwen2_5_VLForConditionalGeneration.

As the reference's aas/more_models/qwen2_5vl.py: the model's processor at native resolution,
capped at max_pixels = 1008 * 1008; image tokens found by config.image_token_id; the map is the
image's image_grid_thw height / 2 x width / 2 (after the 2 x 2 patch merge), so it differs per
image and is rarely square. The processor resizes (it does not pad), so maps are resized back.
The LM's rotary positions are 3D (temporal, row, column for image tokens): the prompt's come
from the model's own get_rope_index, and each generated token continues them.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
)

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.chat_backend import EncodedImage, chat_template_backend

# the reference's AutoProcessor.from_pretrained(..., max_pixels=1008*1008)
REFERENCE_MAX_PIXELS = 1008 * 1008


class Qwen2_5_VLLayout:
    """Qwen2.5-VL's image layout (models/chat_backend.py: ImageLayout). max_pixels: the
    processor's cap on the resized image's area (its `size["longest_edge"]`)."""

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor,
        *,
        max_pixels: int = REFERENCE_MAX_PIXELS,
    ):
        self.model = model
        self.processor = processor
        self.max_pixels = max_pixels
        self.merge = model.config.vision_config.spatial_merge_size

    def image_kwargs(self):
        return {
            "size": {
                "shortest_edge": self.processor.image_processor.size["shortest_edge"],
                "longest_edge": self.max_pixels,
            }
        }

    def image_features(self, inputs):
        return self.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output[0]

    def grid(self, inputs, n_image, image_size):
        _, rows, columns = (int(n) // self.merge for n in inputs["image_grid_thw"][0])
        if rows * columns != n_image:
            raise ValueError(
                f"image_grid_thw {inputs['image_grid_thw'][0].tolist()} does not give "
                f"{n_image} tokens"
            )
        return (rows, columns), None

    def positions(self, ids, visual_tokens: EncodedImage):
        """(3, 1, S) positions of the whole prompt, as the model's generate computes them, and
        the first generated token's: the prompt's largest + 1, on all three axes (a generated
        token at sequence index i is at i + the prompt's largest + 1 - S: get_rope_index's
        mrope_position_deltas)."""
        input_ids = torch.tensor([ids], device=self.model.device)
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            (input_ids == self.model.config.image_token_id).int(),
            image_grid_thw=visual_tokens.inputs["image_grid_thw"],
        )
        return positions, int(positions.max()) + 1


def qwen2_5_vl_backend(
    model: Qwen2_5_VLForConditionalGeneration,
    processor,
    *,
    max_pixels: int = REFERENCE_MAX_PIXELS,
    **options,
) -> Backend:
    """options: chat_template_backend's (conversation, compile)."""
    layout = Qwen2_5_VLLayout(model, processor, max_pixels=max_pixels)
    return chat_template_backend(model, processor, layout, **options)


def load_qwen2_5_vl(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_pixels: int = REFERENCE_MAX_PIXELS,
    **options,
) -> Backend:
    """A local Hugging Face directory (or a cached hub id, offline), e.g.
    Qwen/Qwen2.5-VL-7B-Instruct: safetensors weights, the processor (preprocessor_config.json,
    tokenizer, chat template)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return qwen2_5_vl_backend(
        model, AutoProcessor.from_pretrained(path), max_pixels=max_pixels, **options
    )
