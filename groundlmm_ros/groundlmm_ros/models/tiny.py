"""Tiny random models built in code, for tests and CI (no downloads): LLaVA, DiffLMM, SAM.

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
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from groundlmm_ros.models.difflmm import (
    SD_DOWN_BLOCKS,
    SD_UP_BLOCKS,
    DiffLMMBackend,
    DiffLMMConfig,
    build_difflmm,
    difflmm_7b_config,
)
from groundlmm_ros.models.llava import LlavaBackend

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
) -> LlavaBackend:
    """Random tiny LLaVA with the tiny BPE tokenizer (tests, CI): weights from `seed`;
    options: LlavaBackend's."""
    tokenizer = tiny_tokenizer()
    return LlavaBackend(tiny_llava(len(tokenizer), seed).to(device, dtype), tokenizer, **options)


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
) -> DiffLMMBackend:
    """Random tiny DiffLMM with the tiny BPE tokenizer (tests, CI): weights from `seed`;
    options: DiffLMMBackend's."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = build_difflmm(tiny_difflmm_config(len(tokenizer), seed=seed), dtype, device)
    return DiffLMMBackend(model, tokenizer, **options)
