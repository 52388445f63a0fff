"""The demo model's recipe: its miniature DiffLMM config, its word-level tokenizer and
the questions it is trained to answer.

Sizes (Recipe's defaults: 64 px model input, 8x8 = 64 visual tokens):
  VAE 64 px -> 4 x 8 x 8 latent (4 blocks, downsampling 8, as in SD; one block more per
    doubling of image_size / latent_side)
  UNet 3 blocks (32, 64, 64) on the 8x8 latent; up_blocks[1] gives 64 x 8 x 8 features
  CLIP ViT with 2 layers, image_size/8 px patches, pre-trained in stage 0 of train.py:
    its penultimate hidden state is the patch embedding after ONE attention layer, so each
    visual token is still mostly its own patch (a prototype found that patch-separating
    features ground far better than whole-object receptive fields)
  Llama: 4 layers, 128 wide, 4 heads (~0.9M parameters)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from groundlmm_ros.engine.engine import GCG_QUESTION
from groundlmm_ros.models.difflmm import DiffLMMConfig
from groundlmm_ros.models.llava_prompts import IMAGE_PLACEHOLDER, Preprocessing, llava_v1_prompt
from groundlmm_ros.world import COLOURS, SHAPES

SCENE_SIZE = 128  # scenes are drawn at this side; the backend resizes them to image_size
GRID = 8  # visual tokens per side, whatever the input size
QUESTIONS = (GCG_QUESTION, "Describe the image.", "What is in the image?")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as Llama orders them
# The demo model's own settings, recorded in the directory it is saved to (presets.py reads them):
# trained with Vicuna's template (as LLaVA-1.5 was; its word-level vocabulary has no "human"),
# on pixels in [-1, 1] padded with grey (DiffLMM's code as written, not as it ran: backend.py).
DEMO_CONVERSATION = "vicuna_v1"
DEMO_PREPROCESSING = Preprocessing(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_color=(127, 127, 127)
)
# Validation scores phrases with the mean of their root tokens' maps. With the word-level
# tokenizer a root is one token, so mean, max and first give the same map.
DEMO_COMBINE = "mean"


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the prompt and caption vocabulary (lower-cased).

    Whitespace is not part of a token, so "the red circle" tokenizes the same at the
    start of an answer, inside a caption and as a refer-mode expression; the WordPiece
    decoder rejoins words with spaces and no space before punctuation."""
    prompt = llava_v1_prompt(" ".join(QUESTIONS), DEMO_CONVERSATION).replace(IMAGE_PLACEHOLDER, " ")
    words = pre_tokenizers.Whitespace().pre_tokenize_str(prompt.lower())
    vocabulary = list(SPECIAL_TOKENS)
    for word in (
        [w for w, _ in words] + "a an the there is and , .".split() + list(COLOURS) + list(SHAPES)
    ):
        if word not in vocabulary:
            vocabulary.append(word)
    tokenizer = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>")
    )
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(cleanup=True)
    # Like Llama's tokenizer: a BOS in front of every encoded text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


CAPTION_ORDERS = ("random", "left-to-right")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TAG_LAYERS = ("last", "read")


@dataclass
class Recipe:
    """What is trained: the model's sizes, the denoiser's target and the caption order."""

    image_size: int = 64  # model input side (64 or 128 px; 8 x 8 visual tokens either way)
    latent_side: int = 8  # VAE latent side (8, or 16 with the UNet read one block earlier)
    latent_channels: int = 4  # SD v1.5 has 4
    prediction_type: str = "epsilon"  # the denoiser's target, as SD v1.5 (diffusers' names)
    clip_layers: int = 2  # the penultimate is read: 1 gives the bare patch embedding
    llama_layers: int = 4
    llama_width: int = 128
    caption_order: str = (
        "random"  # "random": reshuffled every time; "left-to-right": by object centre x
    )
    projector_lr_scale: float = 1.0  # the projector's learning rate relative to the Llama's
    tag_layer: str = (
        "read"  # which CLIP layer stage 0's tags score: "read" (the penultimate) or "last"
    )

    def __post_init__(self):
        for name, allowed in (
            ("image_size", (64, 128)),
            ("latent_side", (8, 16)),
            ("latent_channels", (4, 8, 16)),
            ("prediction_type", PREDICTION_TYPES),
            ("caption_order", CAPTION_ORDERS),
            ("tag_layer", TAG_LAYERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 1 <= self.clip_layers <= 4:
            raise ValueError(f"clip_layers must be in 1..4, got {self.clip_layers}")
        if not 0.0 <= self.projector_lr_scale <= 10.0:
            raise ValueError(
                f"projector_lr_scale must be in [0, 10], got {self.projector_lr_scale}"
            )


def demo_config(vocab_size: int, seed: int = 0, recipe: Recipe = Recipe()) -> DiffLMMConfig:
    """The miniature DiffLMM (sizes in the module docstring); the diffusers configs are
    filled in by the classes themselves so every default is written down."""
    size, latent = recipe.image_size, recipe.latent_side
    # VAE downsampling size / latent: 8 for 64 px -> 8 x 8 (4 blocks, as SD), one block more per
    # halving.
    vae_blocks = [16, 16, 32, 32, 32][: int(math.log2(size // latent)) + 1]
    vae_config = dict(
        AutoencoderKL.from_config(
            dict(
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * len(vae_blocks),
                up_block_types=["UpDecoderBlock2D"] * len(vae_blocks),
                block_out_channels=vae_blocks,
                layers_per_block=1,
                latent_channels=recipe.latent_channels,
                norm_num_groups=8,
                sample_size=size,
            )
        ).config
    )
    unet_config = dict(
        UNet2DConditionModel.from_config(
            dict(
                sample_size=latent,
                in_channels=recipe.latent_channels,
                out_channels=recipe.latent_channels,
                block_out_channels=[32, 64, 64],
                layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=8,
            )
        ).config
    )
    scheduler_config = dict(
        DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type=recipe.prediction_type,
        ).config
    )
    clip_width = size  # a patch of 3 x (size / 8)^2 values -> size (64 px: 192 -> 64)
    clip = CLIPVisionConfig(
        hidden_size=clip_width,
        intermediate_size=2 * clip_width,
        num_hidden_layers=recipe.clip_layers,
        num_attention_heads=2,
        image_size=size,
        patch_size=size // GRID,
    ).to_dict()
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.llama_width,
        intermediate_size=3 * recipe.llama_width,
        num_hidden_layers=recipe.llama_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    ).to_dict()
    # The UNet's up_blocks[1] gives latent/2 * 2 = latent: an 8 x 8 grid from an 8 x 8 latent;
    # from a 16 x 16 latent the 8 x 8 grid is up_blocks[0]'s output.
    return DiffLMMConfig(
        unet=unet_config,
        vae=vae_config,
        scheduler=scheduler_config,
        clip=clip,
        llama=llama,
        image_size=size,
        timestep=100,
        feature_block=1 if latent == GRID else 0,
        seed=seed,
        image_mean=DEMO_PREPROCESSING.mean,
        image_std=DEMO_PREPROCESSING.std,
        pad_color=DEMO_PREPROCESSING.pad_color,
    )
