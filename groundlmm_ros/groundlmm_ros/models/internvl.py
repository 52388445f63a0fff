"""InternVL on transformers' InternVLForConditionalGeneration (the -hf checkpoints).

Dynamic tiling (the processor's crop_to_patches, InternVL's dynamic_preprocess): the image is
stretched to columns x rows tiles of the vision tower's size, the tile grid whose aspect is
closest to the image's among min_patches..max_patches tiles, plus a thumbnail (the whole
image stretched to one tile) when there is more than one tile. Each tile gives side x side
tokens (16 x 16 for 448-pixel tiles after the 0.5 pixel shuffle), row-major, tiles in
row-major order, then the thumbnail's. As the reference's aas/more_models/internvl2_5.py, the
map is the tiles' tokens stitched into one (rows * side) x (columns * side) grid, the
thumbnail left out; with use_thumbnail, the thumbnail's side x side (the reference's
--use-thumbnail-attention). Both are stretches of the whole image, so maps are resized back.
The reference's tiling: 3 to 9 tiles (--min-image-crops, --max-image-crops).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoProcessor,
    InternVLForConditionalGeneration,
)
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.chat_backend import chat_template_backend, sequential_positions

REFERENCE_TILES = (3, 9)  # the reference's --min-image-crops 3 --max-image-crops 9
# What InternVL's image loader (and the -hf processors) normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVLLayout:
    """InternVL's image layout (models/chat_backend.py: ImageLayout). tiles: (min, max) tiles
    per image; use_thumbnail: the map is the thumbnail's."""

    def __init__(
        self,
        model: InternVLForConditionalGeneration,
        processor,
        *,
        tiles: tuple[int, int] = REFERENCE_TILES,
        use_thumbnail: bool = False,
    ):
        self.model = model
        self.processor = processor
        self.tiles = tiles
        self.use_thumbnail = use_thumbnail

    def image_kwargs(self):
        return {"crop_to_patches": True, "min_patches": self.tiles[0], "max_patches": self.tiles[1]}

    def image_features(self, inputs):
        config = self.model.config
        features = self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        # (tiles, side * side, hidden) -> in the order the prompt has them
        return features.flatten(0, 1)

    def grid(self, inputs, n_image, image_size):
        tile = self.processor.image_processor.size
        columns, rows = get_optimal_tiled_canvas(
            tuple(image_size), (tile["height"], tile["width"]), *self.tiles
        )
        n_tiles = rows * columns
        n_patches = n_tiles + (n_tiles > 1)  # the thumbnail comes after more than one tile
        if inputs["pixel_values"].shape[0] != n_patches or n_image % n_patches:
            raise ValueError(
                f"{inputs['pixel_values'].shape[0]} patches and {n_image} image tokens do not fit "
                f"{columns} x {rows} tiles"
            )
        per_tile = n_image // n_patches
        side = int(round(per_tile**0.5))
        if self.use_thumbnail:
            if n_tiles == 1:
                raise ValueError(
                    "a one-tile image has no thumbnail (use_thumbnail needs at least min 2 tiles)"
                )
            return (side, side), n_tiles * per_tile + torch.arange(per_tile)
        # Map cell (y, x) is token (y % side, x % side) of tile (y // side, x // side).
        y = torch.arange(rows * side)[:, None]
        x = torch.arange(columns * side)[None, :]
        index = ((y // side) * columns + x // side) * per_tile + (y % side) * side + x % side
        return (rows * side, columns * side), index.flatten()

    def positions(self, ids, visual_tokens):
        return sequential_positions(ids, self.model.device)


def internvl_backend(
    model: InternVLForConditionalGeneration,
    processor,
    *,
    tiles: tuple[int, int] = REFERENCE_TILES,
    use_thumbnail: bool = False,
    **options,
) -> Backend:
    """options: chat_template_backend's (conversation, compile)."""
    layout = InternVLLayout(model, processor, tiles=tiles, use_thumbnail=use_thumbnail)
    return chat_template_backend(model, processor, layout, **options)


def load_internvl(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tiles: tuple[int, int] = REFERENCE_TILES,
    use_thumbnail: bool = False,
    **options,
) -> Backend:
    """A local -hf directory (or a cached hub id, offline), e.g. OpenGVLab/InternVL3-8B-hf."""
    model = InternVLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return internvl_backend(
        model,
        AutoProcessor.from_pretrained(path),
        tiles=tiles,
        use_thumbnail=use_thumbnail,
        **options,
    )
