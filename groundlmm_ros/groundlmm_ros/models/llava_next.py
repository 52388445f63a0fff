"""LLaVA-NeXT (LLaVA-1.6) on transformers' LlavaNextForConditionalGeneration.

Any-resolution layout (the model's pack_image_features): the image's run of tokens is the base
image (resized to one square tile: side x side tokens, 24 x 24 for 336-pixel CLIP) followed by
the high-resolution tiles stitched into one feature canvas, the canvas's padding rows or
columns removed (unpad_image), and one newline token after every remaining row.
As the reference's aas/more_models/llava_next.py, the map is the unpadded high-resolution
grid with the newline column dropped; with use_base_patches, the base tile's side x side.
Both cover the whole image without padding (the unpadded canvas is the resized image, the base
tile the image stretched to a square), so maps are resized straight back to the image.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.chat_backend import chat_template_backend, sequential_positions


class LlavaNextLayout:
    """LLaVA-NeXT's image layout (models/chat_backend.py: ImageLayout). use_base_patches: the
    map is the base tile's grid instead of the high-resolution one (the reference's
    --use-base-patches)."""

    def __init__(self, model: LlavaNextForConditionalGeneration, *, use_base_patches: bool = False):
        self.model = model
        self.use_base_patches = use_base_patches

    def image_kwargs(self):
        return {}

    def image_features(self, inputs):
        config = self.model.config
        return self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output[0]

    def grid(self, inputs, n_image, image_size):
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side
        if self.use_base_patches:
            return (side, side), torch.arange(base)
        # The high-resolution canvas and its unpadded part, by the model's own functions.
        size = inputs["image_sizes"][0].tolist()  # (height, width), as the model reads it
        pinpoints = self.model.config.image_grid_pinpoints
        tiles_high, tiles_wide = get_anyres_image_grid_shape(size, pinpoints, vision.image_size)
        canvas = torch.empty(1, tiles_high * side, tiles_wide * side)
        rows, columns = unpad_image(canvas, size).shape[1:]
        if base + rows * (columns + 1) != n_image:
            raise ValueError(
                f"{n_image} image tokens, the layout needs {base} + {rows} x ({columns} + 1)"
            )
        # Row r's tokens start at base + r * (columns + 1); the last of each row is its newline.
        starts = base + torch.arange(rows)[:, None] * (columns + 1)
        return (rows, columns), (starts + torch.arange(columns)).flatten()

    def positions(self, ids, visual_tokens):
        return sequential_positions(ids, self.model.device)


def llava_next_backend(
    model: LlavaNextForConditionalGeneration,
    processor,
    *,
    use_base_patches: bool = False,
    **options,
) -> Backend:
    """options: chat_template_backend's (conversation, compile)."""
    layout = LlavaNextLayout(model, use_base_patches=use_base_patches)
    return chat_template_backend(model, processor, layout, **options)


def load_llava_next(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    use_base_patches: bool = False,
    **options,
) -> Backend:
    """A local llava-hf directory (or a cached hub id, offline), e.g.
    llava-hf/llava-v1.6-mistral-7b-hf."""
    model = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return llava_next_backend(
        model, AutoProcessor.from_pretrained(path), use_base_patches=use_base_patches, **options
    )
