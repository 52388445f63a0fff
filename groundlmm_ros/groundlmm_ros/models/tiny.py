"""Tiny random models built in code, for tests and CI (no downloads): LLaVA, DiffLMM, SAM,
Qwen2.5-VL, LLaVA-NeXT and InternVL with their processors.

The tokenizer is a real byte-level BPE trained here on a fixed corpus (so words
outside it, and non-ASCII text, split into several tokens as with real models).
Everything is deterministic for a seed and builds in well under a second.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.difflmm import (
    SD_DOWN_BLOCKS,
    SD_UP_BLOCKS,
    DiffLMMConfig,
    build_difflmm,
    difflmm_7b_config,
    difflmm_backend,
)
from groundlmm_ros.models.internvl import IMAGENET_MEAN, IMAGENET_STD, internvl_backend
from groundlmm_ros.models.llava import llava_backend
from groundlmm_ros.models.llava_next import llava_next_backend
from groundlmm_ros.models.qwen2_5_vl import qwen2_5_vl_backend

_CORPUS = [
    "A man in a red shirt holds a white mug on the wooden table.",
    "The dog sits next to a bicycle near the street, and a woman walks past the shop.",
    "There is a cat on the sofa, two cups, a laptop and a lamp in the living room.",
    "USER: Describe the image in detail. ASSISTANT: The image shows a kitchen with a sink.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
]
TINY_VOCAB = 384


@lru_cache(maxsize=1)
def _trained_bpe() -> str:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    # Like Llama's tokenizer: a BOS in front of every encoded text.
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return bpe.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_lm_sizes(hidden: int, layers: int) -> dict:
    """The language-model sizes the tiny models share: width `hidden`, `layers` layers, and
    grouped-query attention (4 query heads over 2 key/value heads)."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def tiny_llava(
    vocab_size: int,
    seed: int = 0,
    *,
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 48,
    patch: int = 8,
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 shaped, tiny: CLIP (image_size/patch)^2 patches -> MLP projector -> Llama with
    grouped-query attention (4 heads over 2 key/value heads), float32, eval mode."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            **tiny_lm_sizes(hidden, layers),
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_id=0,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> Backend:
    """Random tiny LLaVA with the tiny BPE tokenizer (tests, CI): weights from `seed`;
    options: llava_backend's."""
    tokenizer = tiny_tokenizer()
    return llava_backend(tiny_llava(len(tokenizer), seed).to(device, dtype), tokenizer, **options)


def tiny_sam(seed: int = 0, image_size: int = 64) -> Sam:
    """segment_anything's Sam with tiny dims (1-block ViT, 16-d prompts); SamPredictor works
    on it unchanged (images resized to image_size, low-res masks of image_size / 4)."""
    patch, dim = 16, 16
    torch.manual_seed(seed)
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch,
            embed_dim=32,
            depth=1,
            num_heads=2,
            mlp_ratio=2,
            out_chans=dim,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(0,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    ).eval()


def tiny_difflmm_config(vocab_size: int, seed: int = 0) -> DiffLMMConfig:
    """A miniature of the same architecture for tests: 32 px input, 16x16 latent, 8x8 grid
    (64 image tokens), a 2-layer Llama of width 32."""
    unet = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=[8, 16, 32, 32],
        attention_head_dim=4,
        cross_attention_dim=16,
        norm_num_groups=8,
        down_block_types=list(SD_DOWN_BLOCKS),
        up_block_types=list(SD_UP_BLOCKS),
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=[8, 16],
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.18215,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = difflmm_7b_config().scheduler
    clip = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    llama = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return DiffLMMConfig(
        unet=unet, vae=vae, scheduler=scheduler, clip=clip, llama=llama, image_size=32, seed=seed
    )


def tiny_difflmm_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> Backend:
    """Random tiny DiffLMM with the tiny BPE tokenizer (tests, CI): weights from `seed`;
    options: difflmm_backend's."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = build_difflmm(tiny_difflmm_config(len(tokenizer), seed=seed), dtype, device)
    return difflmm_backend(model, tokenizer, **options)


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
TINY_QWEN_PATCH = 8  # pixels per vision patch (Qwen2.5-VL: 14); merged tokens cover 16 x 16 pixels
TINY_QWEN_MAX_PIXELS = 128 * 128


def tiny_qwen_processor(patch_size: int = TINY_QWEN_PATCH) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor classes around the tiny byte-level BPE with Qwen's special tokens
    and no BOS (Qwen's tokenizer adds none)."""
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.bos_token = None
    tokenizer.eos_token = "<|im_end|>"
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * patch_size) ** 2,
        max_pixels=TINY_QWEN_MAX_PIXELS,
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
    patch_size: int = TINY_QWEN_PATCH,
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
            **tiny_lm_sizes(hidden, layers),
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
) -> Backend:
    processor = tiny_qwen_processor()
    model = tiny_qwen2_5_vl(processor.tokenizer, seed).to(device, dtype)
    return qwen2_5_vl_backend(model, processor, max_pixels=TINY_QWEN_MAX_PIXELS, **options)


# -- tiny random LLaVA-NeXT (tests) ----------------------------------------------------------

TINY_NEXT_TILE = 32  # pixels per tile (LLaVA-NeXT: 336)
TINY_NEXT_PATCH = 8  # pixels per vision patch (14): 4 x 4 tokens per tile
# LLaVA-NeXT's five layouts, scaled
TINY_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
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
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TINY_NEXT_TILE},
        crop_size={"height": TINY_NEXT_TILE, "width": TINY_NEXT_TILE},
        image_grid_pinpoints=TINY_NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_NEXT_PATCH,
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
            image_size=TINY_NEXT_TILE,
            patch_size=TINY_NEXT_PATCH,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            **tiny_lm_sizes(hidden, layers),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_options,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=TINY_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_llava_next_backend(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **options
) -> Backend:
    processor = tiny_llava_next_processor()
    model = tiny_llava_next(processor.tokenizer, seed).to(device, dtype)
    return llava_next_backend(model, processor, **options)


# -- tiny random InternVL (tests) ------------------------------------------------------------

TINY_INTERNVL_TILE = 32  # pixels per tile (InternVL: 448)
TINY_INTERNVL_PATCH = 4  # 8 x 8 patches per tile, 4 x 4 tokens after the pixel shuffle
TINY_INTERNVL_TILES = (1, 6)
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
    bpe = tiny_tokenizer().backend_tokenizer
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
        size={"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE},
        crop_to_patches=True,
        min_patches=TINY_INTERNVL_TILES[0],
        max_patches=TINY_INTERNVL_TILES[1],
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    video_processor = InternVLVideoProcessor(
        size={"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE}
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=(TINY_INTERNVL_TILE // TINY_INTERNVL_PATCH // 2) ** 2,
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
            image_size=[TINY_INTERNVL_TILE, TINY_INTERNVL_TILE],
            patch_size=[TINY_INTERNVL_PATCH, TINY_INTERNVL_PATCH],
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            **tiny_lm_sizes(hidden, layers),
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_options,
        ),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(TINY_INTERNVL_TILE // TINY_INTERNVL_PATCH // 2) ** 2,
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
) -> Backend:
    processor = tiny_internvl_processor()
    model = tiny_internvl(processor.tokenizer, seed).to(device, dtype)
    return internvl_backend(model, processor, tiles=TINY_INTERNVL_TILES, **options)
