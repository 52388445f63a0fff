"""LLaVA-NeXT (LLaVA-1.6) on transformers' LlavaNextForConditionalGeneration, and a tiny random one.

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
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from groundlmm_ros.models import tiny
from groundlmm_ros.models.chat_backend import ChatTemplateBackend


class LlavaNextBackend(ChatTemplateBackend):
    """use_base_patches: the map is the base tile's grid instead of the high-resolution one
    (the reference's --use-base-patches); options: ChatTemplateBackend's."""

    def __init__(
        self,
        model: LlavaNextForConditionalGeneration,
        processor,
        *,
        use_base_patches: bool = False,
        **options,
    ):
        super().__init__(model, processor, **options)
        self.use_base_patches = use_base_patches

    def image_features(self, inputs):
        config = self.lm.config
        return self.lm.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output[0]

    def layout(self, inputs, n_image, image_size):
        vision = self.lm.config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side
        if self.use_base_patches:
            return (side, side), torch.arange(base)
        # The high-resolution canvas and its unpadded part, by the model's own functions.
        size = inputs["image_sizes"][0].tolist()  # (height, width), as the model reads it
        pinpoints = self.lm.config.image_grid_pinpoints
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


def load_llava_next(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    use_base_patches: bool = False,
    **options,
) -> LlavaNextBackend:
    """A local llava-hf directory (or a cached hub id, offline), e.g.
    llava-hf/llava-v1.6-mistral-7b-hf."""
    model = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return LlavaNextBackend(
        model, AutoProcessor.from_pretrained(path), use_base_patches=use_base_patches, **options
    )


# -- tiny random LLaVA-NeXT (tests) ----------------------------------------------------------

TINY_TILE = 32  # pixels per tile (LLaVA-NeXT: 336)
TINY_PATCH = 8  # pixels per vision patch (14): 4 x 4 tokens per tile
TINY_PINPOINTS = [
    [32, 64],
    [64, 32],
    [64, 64],
    [96, 32],
    [32, 96],
]  # LLaVA-NeXT's five layouts, scaled
# llava-hf's LLaVA-NeXT (vicuna) template for one user turn: images first, then text.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llava_next_processor() -> LlavaNextProcessor:
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TINY_TILE},
        crop_size={"height": TINY_TILE, "width": TINY_TILE},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )


def tiny_llava_next(
    tokenizer, seed: int = 0, *, hidden: int = 32, layers: int = 2, **text_options
) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT shaped, tiny: CLIP (4 x 4 patches + CLS per tile), MLP projector, the learned
    newline, a Llama LM with grouped-query attention (4 heads over 2 key/value heads); float32,
    eval mode. text_options go to the Llama config."""
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_TILE,
            patch_size=TINY_PATCH,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            **tiny.tiny_lm_sizes(hidden, layers),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_options,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_llava_next_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> LlavaNextBackend:
    processor = tiny_llava_next_processor()
    model = tiny_llava_next(processor.tokenizer, seed).to(device, dtype)
    return LlavaNextBackend(model, processor, **options)
