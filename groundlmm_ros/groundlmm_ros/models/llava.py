"""LLaVA-1.5 on transformers' LlavaForConditionalGeneration (llava-hf layout)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.llava_prompts import CLIP_PREPROCESSING, LlavaPrompts
from groundlmm_ros.models.recorder import RECORDING_ATTENTION


class LlavaVision:
    """LlavaForConditionalGeneration's vision encoder (models/llava_prompts.py: VisionEncoder)."""

    def __init__(self, model: LlavaForConditionalGeneration):
        self.model = model

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N_image, hidden): CLIP layer `vision_feature_layer` (-2),
        CLS dropped ("default" strategy), through the projector."""
        config = self.model.config
        features = self.model.get_image_features(
            pixel_values=pixel_values.to(self.model.get_input_embeddings().weight.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output  # a list, one (N_image, hidden) per image
        return torch.stack(features)


def llava_backend(
    model: LlavaForConditionalGeneration,
    tokenizer,
    *,
    conversation: str = "",
    compile: bool = False,
) -> Backend:
    """model: LlavaForConditionalGeneration; the vision tower keeps its own attention, only the
    text model records. Pixels as LLaVA-1.5 was trained: pad to square with CLIP's mean colour,
    CLIP's mean/std."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    prompts = LlavaPrompts(
        LlavaVision(model),
        tokenizer,
        model.get_input_embeddings(),
        grid=(side, side),
        image_size=vision.image_size,
        preprocessing=CLIP_PREPROCESSING,
        conversation=conversation,
    )
    return Backend(
        model,
        tokenizer,
        prompts,
        end_ids={tokenizer.eos_token_id},
        text_attention={"text_config": RECORDING_ATTENTION},
        compile=compile,
    )


def load_llava(
    path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **options
) -> Backend:
    """A local llava-hf directory (or a cached hub id, offline): weights as safetensors.
    options: llava_backend's (conversation, compile)."""
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True
    ).to(device)
    return llava_backend(model, AutoTokenizer.from_pretrained(path), **options)
