"""Qwen2.5-VL on transformers' Qwen2_5_VLForConditionalGeneration, and a tiny random one for tests.

As the reference's aas/more_models/qwen2_5vl.py: the model's processor at native resolution,
capped at max_pixels = 1008 * 1008; image tokens found by config.image_token_id; the map is the
image's image_grid_thw height / 2 x width / 2 (after the 2 x 2 patch merge), so it differs per
image and is rarely square. The processor resizes (it does not pad), so maps are resized back.
The LM's rotary positions are 3D (temporal, row, column for image tokens): the prompt's come
from the model's own get_rope_index, and each generated token continues them.
"""

from __future__ import annotations

import torch
from tokenizers import processors
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from groundlmm_ros.models import tiny
from groundlmm_ros.models.chat_backend import ChatTemplateBackend, EncodedImage

# the reference's AutoProcessor.from_pretrained(..., max_pixels=1008*1008)
REFERENCE_MAX_PIXELS = 1008 * 1008


class Qwen2_5_VLBackend(ChatTemplateBackend):
    """max_pixels: the processor's cap on the resized image's area (its `size["longest_edge"]`);
    options: ChatTemplateBackend's."""

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor,
        *,
        max_pixels: int = REFERENCE_MAX_PIXELS,
        **options,
    ):
        super().__init__(model, processor, **options)
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
        return self.lm.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output[0]

    def layout(self, inputs, n_image, image_size):
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
        input_ids = torch.tensor([ids], device=self.device)
        positions, _ = self.lm.model.get_rope_index(
            input_ids,
            (input_ids == self.image_token_id).int(),
            image_grid_thw=visual_tokens.inputs["image_grid_thw"],
        )
        return positions, int(positions.max()) + 1


def load_qwen2_5_vl(
    path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_pixels: int = REFERENCE_MAX_PIXELS,
    **options,
) -> Qwen2_5_VLBackend:
    """A local Hugging Face directory (or a cached hub id, offline), e.g.
    Qwen/Qwen2.5-VL-7B-Instruct: safetensors weights, the processor (preprocessor_config.json,
    tokenizer, chat template)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return Qwen2_5_VLBackend(
        model, AutoProcessor.from_pretrained(path), max_pixels=max_pixels, **options
    )


# -- tiny random Qwen2.5-VL (tests, the node without weights) ---------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL's chat template for text and image turns (its video and vision-id branches left out).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_PATCH = 8  # pixels per vision patch (Qwen2.5-VL: 14); merged tokens cover 16 x 16 pixels
TINY_MAX_PIXELS = 128 * 128


def tiny_qwen_processor(patch_size: int = TINY_PATCH) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor classes around the tiny byte-level BPE with Qwen's special tokens
    and no BOS (Qwen's tokenizer adds none)."""
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.bos_token = None
    tokenizer.eos_token = "<|im_end|>"
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * patch_size) ** 2,
        max_pixels=TINY_MAX_PIXELS,
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    *,
    hidden: int = 32,
    layers: int = 2,
    patch_size: int = TINY_PATCH,
    **text_options,
) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL shaped, tiny: windowed + full vision blocks, 2 x 2 merge, a Qwen2 LM with
    grouped-query attention (4 heads over 2 key/value heads) and 3D rotary positions; float32,
    eval mode. text_options go to the text config (e.g. a sliding window)."""
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=4 * patch_size,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            **tiny.tiny_lm_sizes(hidden, layers),
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
            },
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
            **text_options,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_qwen2_5_vl_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> Qwen2_5_VLBackend:
    processor = tiny_qwen_processor()
    model = tiny_qwen2_5_vl(processor.tokenizer, seed).to(device, dtype)
    return Qwen2_5_VLBackend(model, processor, max_pixels=TINY_MAX_PIXELS, **options)
