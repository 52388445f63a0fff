"""InternVL on transformers' InternVLForConditionalGeneration (the -hf checkpoints), and a tiny one.

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
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from groundlmm_ros.models import tiny
from groundlmm_ros.models.chat_backend import ChatTemplateBackend

REFERENCE_TILES = (3, 9)  # the reference's --min-image-crops 3 --max-image-crops 9
IMAGENET_MEAN = (
    0.485,
    0.456,
    0.406,
)  # what InternVL's image loader (and the -hf processors) normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVLBackend(ChatTemplateBackend):
    """tiles: (min, max) tiles per image; use_thumbnail: the map is the thumbnail's; options:
    ChatTemplateBackend's."""

    def __init__(
        self,
        model: InternVLForConditionalGeneration,
        processor,
        *,
        tiles: tuple[int, int] = REFERENCE_TILES,
        use_thumbnail: bool = False,
        **options,
    ):
        super().__init__(model, processor, **options)
        self.tiles = tiles
        self.use_thumbnail = use_thumbnail

    def image_kwargs(self):
        return {"crop_to_patches": True, "min_patches": self.tiles[0], "max_patches": self.tiles[1]}

    def image_features(self, inputs):
        config = self.lm.config
        features = self.lm.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        return features.flatten(
            0, 1
        )  # (tiles, side * side, hidden) -> in the order the prompt has them

    def layout(self, inputs, n_image, image_size):
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


def load_internvl(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tiles: tuple[int, int] = REFERENCE_TILES,
    use_thumbnail: bool = False,
    **options,
) -> InternVLBackend:
    """A local -hf directory (or a cached hub id, offline), e.g. OpenGVLab/InternVL3-8B-hf."""
    model = InternVLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return InternVLBackend(
        model,
        AutoProcessor.from_pretrained(path),
        tiles=tiles,
        use_thumbnail=use_thumbnail,
        **options,
    )


# -- tiny random InternVL (tests) ------------------------------------------------------------

TINY_TILE = 32  # pixels per tile (InternVL: 448)
TINY_PATCH = 4  # 8 x 8 patches per tile, 4 x 4 tokens after the pixel shuffle
TINY_TILES = (1, 6)
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# The -hf checkpoints' template for text and image turns (ChatML, the image first).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl_processor() -> InternVLProcessor:
    bpe = tiny.tiny_tokenizer().backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=INTERNVL_TOKENS,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS.values()]}
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": TINY_TILE, "width": TINY_TILE},
        crop_to_patches=True,
        min_patches=TINY_TILES[0],
        max_patches=TINY_TILES[1],
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    video_processor = InternVLVideoProcessor(size={"height": TINY_TILE, "width": TINY_TILE})
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=(TINY_TILE // TINY_PATCH // 2) ** 2,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def tiny_internvl(
    tokenizer, seed: int = 0, *, hidden: int = 32, layers: int = 2, **text_options
) -> InternVLForConditionalGeneration:
    """InternVL shaped, tiny: an InternViT (CLS + 8 x 8 patches per tile), 0.5 pixel shuffle, MLP
    projector, a Qwen2 LM with grouped-query attention (4 heads over 2 key/value heads); float32,
    eval mode. text_options go to the Qwen2 config."""
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=[TINY_TILE, TINY_TILE],
            patch_size=[TINY_PATCH, TINY_PATCH],
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            **tiny.tiny_lm_sizes(hidden, layers),
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_options,
        ),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(TINY_TILE // TINY_PATCH // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        # (as InternVL3-8B) a tied tiny LM only repeats its last input token
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_internvl_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> InternVLBackend:
    processor = tiny_internvl_processor()
    model = tiny_internvl(processor.tokenizer, seed).to(device, dtype)
    return InternVLBackend(model, processor, tiles=TINY_TILES, **options)
