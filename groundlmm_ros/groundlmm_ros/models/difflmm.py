"""DiffLMM (docs/method.md, section 2): a LLaVA-1.5-style LMM whose visual
encoder is one Stable Diffusion UNet pass, conditioned on CLIP through an
implicit captioner.

    pixels (B, 3, R, R), normalised as the checkpoint's `Preprocessing` says
      ├─ CLIP ViT (input resized to its own size) → penultimate patch tokens (B, N, C_clip)
      │     └─ captioner: clip_projector + clip_pe → (B, N, C_xattn), the UNet's text condition
      └─ VAE encode → latents (B, 4, L, L) → DDIM add_noise at t → UNet; the output of
         up_blocks[k] is the feature map (B, C_sd, G, G)
    SDCLIPBlock(features, CLIP tokens) → visual tokens (B, N = G*G, hidden) → LlamaForCausalLM

Every size follows from the component configs (the released model: R=384, L=48, G=24,
N=576, C_sd=1280, C_clip=1024, C_xattn=768, hidden=4096), so a miniature model is built
by the same code as the 7B one. Module and parameter names of `SDCLIPBlock` are the
reference's, so the released `non_lora_trainables.bin` maps onto it one to one.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.llava_prompts import (
    CLIP_MEAN,
    CLIP_PREPROCESSING,
    CLIP_STD,
    LlavaPrompts,
    Preprocessing,
)

MODEL_TYPE = "difflmm"
# The CLIP hidden state DiffLMM reads: the penultimate, as LLaVA-1.5 reads its CLIP.
CLIP_READ_LAYER = -2
# What the tower undoes before applying CLIP's statistics: the reference's sd_to_clip_img
# hard-codes x * 0.5 + 0.5, whatever normalisation the pixels really had (the released weights
# were trained with CLIP's, see CLIP_PREPROCESSING), and the weights were trained so: keep it.
TOWER_UNDO_MEAN = TOWER_UNDO_STD = (0.5, 0.5, 0.5)


@dataclass
class DiffLMMConfig:
    """Everything needed to build a DiffLMM; plain dicts so it round-trips through JSON.

    unet / vae / scheduler: diffusers configs (UNet2DConditionModel, AutoencoderKL,
    DDIMScheduler); clip: a CLIPVisionConfig dict; llama: a LlamaConfig dict.
    """

    unet: dict
    vae: dict
    scheduler: dict
    clip: dict
    llama: dict
    image_size: int = 384  # side of the square model input (mm_vision_resolution)
    timestep: int = 100  # DDIM noise level of the single UNet pass (mm_vision_sd_timestep)
    feature_block: int = (
        1  # index of the UNet up block whose output is read (mm_vision_select_layer)
    )
    seed: int = 0  # seed of the VAE sample and the diffusion noise, reset on every image
    # The pixels the weights were trained on (Preprocessing); default: the released DiffLMM's.
    image_mean: tuple = CLIP_PREPROCESSING.mean
    image_std: tuple = CLIP_PREPROCESSING.std
    pad_color: tuple = CLIP_PREPROCESSING.pad_color
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the demo model's recipe)

    def __post_init__(self):
        self.image_mean, self.image_std, self.pad_color = map(
            tuple, (self.image_mean, self.image_std, self.pad_color)
        )
        n_up = len(self.unet["up_block_types"])
        if not 0 <= self.feature_block < n_up - 1:
            raise ValueError(
                f"feature_block {self.feature_block} must name a UNet up block with an upsampler "
                f"(0..{n_up - 2})"
            )
        latent = self.image_size / 2 ** (len(self.vae["block_out_channels"]) - 1)
        n_downsamplers = len(self.unet["down_block_types"]) - 1
        if latent != int(latent) or int(latent) % 2**n_downsamplers:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by the VAE's and the UNet's "
                "downsampling together "
                f"({2 ** (len(self.vae['block_out_channels']) - 1 + n_downsamplers)})"
            )
        clip_grid = self.clip["image_size"] / self.clip["patch_size"]
        if clip_grid != self.grid:
            raise ValueError(
                f"CLIP grid {clip_grid} (image_size/patch_size) != UNet feature grid {self.grid}: "
                "the projector concatenates the two per patch"
            )

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_mean, self.image_std, self.pad_color)

    @property
    def latent_size(self) -> int:
        """Side L of the VAE latent: image_size over the VAE's downsampling factor."""
        return self.image_size // 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def grid(self) -> int:
        """Side G of the feature map read after up_blocks[feature_block] (24 for the real model).

        The UNet halves L once per down block but the last; up block k ends with an upsampler,
        so its output is L / 2**(n_down - 2 - k).
        """
        n_downsamplers = len(self.unet["down_block_types"]) - 1
        return self.latent_size // 2 ** (n_downsamplers - 1 - self.feature_block)

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def sd_channels(self) -> int:
        """C_sd: channels of up_blocks[feature_block]'s output (1280 for SD v1.5, block 1)."""
        return list(reversed(self.unet["block_out_channels"]))[self.feature_block]

    @property
    def sd_projected_channels(self) -> int:
        """Width of the 1x1 conv on the SD features: the reference uses hidden_size // 4."""
        return self.llama["hidden_size"] // 4

    def to_json(self) -> str:
        """With model_type "difflmm", the key presets.py picks a directory's loader by."""
        return json.dumps(
            {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}, indent=1, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> "DiffLMMConfig":
        fields = json.loads(text)
        if fields.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f'model_type is not "{MODEL_TYPE}"')
        return cls(**fields)


# Stable Diffusion v1.5's UNet layout (the tiny test model keeps it at toy widths): three
# cross-attention blocks and a plain one down, mirrored up.
SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP_BLOCKS = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


def difflmm_7b_config(seed: int = 0) -> DiffLMMConfig:
    """The released DiffLMM's shapes: SD v1.5 UNet and VAE, CLIP ViT-L/14-336, Vicuna-7B v1.5.
    Used to build it with random weights (benchmarks); the checkpoint loader reads the real
    configs from the model directories instead."""
    unet = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        act_fn="silu",
        block_out_channels=[320, 640, 1280, 1280],
        attention_head_dim=8,
        cross_attention_dim=768,
        down_block_types=list(SD_DOWN_BLOCKS),
        up_block_types=list(SD_UP_BLOCKS),
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        act_fn="silu",
        block_out_channels=[128, 256, 512, 512],
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    clip = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    llama = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return DiffLMMConfig(unet=unet, vae=vae, scheduler=scheduler, clip=clip, llama=llama, seed=seed)


class SDCLIPBlock(nn.Module):
    """The trained part of DiffLMM (the reference's `mm_projector`): the implicit captioner
    (`clip_projector`, `clip_pe`) and the projector to the LLM (`sd_norm_layer`,
    `sd_proj_layer`, `linear`, `vt_pe`). Names match the released tensors."""

    def __init__(
        self,
        clip_channels: int,
        xattn_channels: int,
        sd_channels: int,
        sd_projected: int,
        hidden: int,
        num_tokens: int,
    ):
        super().__init__()
        self.clip_projector = nn.Sequential(
            nn.Linear(clip_channels, xattn_channels),
            nn.GELU(),
            nn.Linear(xattn_channels, xattn_channels),
        )
        self.clip_pe = nn.Parameter(torch.randn(num_tokens, xattn_channels))  # (N, C_xattn)
        self.sd_norm_layer = nn.LayerNorm(sd_channels)
        self.sd_proj_layer = nn.Sequential(
            nn.Conv2d(sd_channels, sd_projected, kernel_size=1), nn.GELU()
        )
        self.linear = nn.Sequential(
            nn.Linear(sd_projected + clip_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.vt_pe = nn.Parameter(torch.randn(num_tokens, hidden))  # (N, hidden)

    def caption(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C_clip) CLIP patch tokens -> (B, N, C_xattn) UNet cross-attention input."""
        return self.clip_projector(clip_tokens) + self.clip_pe

    def forward(self, sd_features: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C_sd, G, G) UNet features + (B, N, C_clip) raw CLIP tokens -> (B, N, hidden)."""
        b, _, g, _ = sd_features.shape
        # LayerNorm over channels
        y = self.sd_norm_layer(sd_features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.sd_proj_layer(y)  # (B, C_proj, G, G)
        clip_map = clip_tokens.transpose(1, 2).reshape(b, -1, g, g)  # (B, C_clip, G, G), row-major
        y = torch.cat([y, clip_map], dim=1).flatten(2).transpose(1, 2)  # (B, N, C_proj + C_clip)
        return self.linear(y) + self.vt_pe


class _FeaturesReady(Exception):
    """Raised by the up-block hook to stop the UNet once the features exist: the remaining
    high-resolution up blocks and conv_out are never used, and skipping them saves about a
    third of the UNet's time (the reference stops there too)."""


def explicit(diffusers_config: dict) -> dict:
    """A stored diffusers config with every value taken as written. diffusers lists the
    keys that were defaults at creation in "_use_default_values" and from_config then
    IGNORES their stored values: a scaling_factor set after training (register_to_config)
    would silently load as SD's 0.18215."""
    return {k: v for k, v in diffusers_config.items() if k != "_use_default_values"}


class SDCLIPVisionTower(nn.Module):
    """The frozen encoders: VAE (encoder only), UNet, CLIP vision model, DDIM noise schedule."""

    def __init__(
        self,
        config: DiffLMMConfig,
        vae: AutoencoderKL | None = None,
        unet: UNet2DConditionModel | None = None,
        clip: CLIPVisionModel | None = None,
    ):
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else AutoencoderKL.from_config(explicit(config.vae))
        # Only the encoder is used; dropping the decoder saves ~50M parameters at SD scale.
        self.vae.decoder = None
        self.vae.post_quant_conv = None
        self.unet = (
            unet if unet is not None else UNet2DConditionModel.from_config(explicit(config.unet))
        )
        self.clip = clip if clip is not None else CLIPVisionModel(CLIPVisionConfig(**config.clip))
        self.scheduler = DDIMScheduler.from_config(explicit(config.scheduler))
        self.requires_grad_(False)
        self.eval()

    def clip_patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, N, C_clip) penultimate-layer patch tokens (CLS dropped)."""
        hidden = self.clip(
            pixel_values=self.clip_inputs(pixels), output_hidden_states=True
        ).hidden_states
        return hidden[CLIP_READ_LAYER][:, 1:]

    def clip_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, 3, S, S): CLIP's own size; the fixed x * 0.5 + 0.5, then CLIP's
        mean/std."""
        size = self.clip.config.image_size
        x = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)

        def per_channel(values):
            return x.new_tensor(values).view(1, 3, 1, 1)

        return (
            x * per_channel(TOWER_UNDO_STD) + per_channel(TOWER_UNDO_MEAN) - per_channel(CLIP_MEAN)
        ) / per_channel(CLIP_STD)

    def noisy_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, R, R) -> (B, 4, L, L): VAE sample x scaling factor, then DDIM add_noise at t.
        Both draws are (1, 4, L, L), shared by the batch, so an image gets the same tokens alone
        or at any place in a batch (training computes features in batches, the node one by one)."""
        posterior = self.vae.encode(pixels).latent_dist
        shape, device, dtype = (
            (1, *posterior.mean.shape[1:]),
            posterior.mean.device,
            posterior.mean.dtype,
        )
        sample = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        latents = (posterior.mean + posterior.std * sample) * self.vae.config.scaling_factor
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype).expand_as(
            latents
        )
        t = torch.full(
            (latents.shape[0],), self.config.timestep, dtype=torch.long, device=latents.device
        )
        return self.scheduler.add_noise(latents, noise, t)

    def unet_features(self, noisy_latents: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """(B, 4, L, L) + (B, N, C_xattn) -> (B, C_sd, G, G), the output of up_blocks[k]
        (its upsampler included). A forward hook, so diffusers' own UNet forward runs."""
        features = []

        def grab(module, args, output):
            features.append(output)
            raise _FeaturesReady

        handle = self.unet.up_blocks[self.config.feature_block].register_forward_hook(grab)
        t = torch.full(
            (noisy_latents.shape[0],),
            self.config.timestep,
            dtype=torch.long,
            device=noisy_latents.device,
        )
        try:
            self.unet(noisy_latents, t, encoder_hidden_states=caption)
        except _FeaturesReady:
            pass
        finally:
            handle.remove()
        return features[0]

    def make_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded with config.seed: the same image always gives the same tokens."""
        return torch.Generator(device=device).manual_seed(self.config.seed)


class DiffLMM(nn.Module):
    """Vision tower + SDCLIPBlock projector + LlamaForCausalLM.

    Pass prebuilt components (e.g. loaded with from_pretrained) or let the config build
    them with random weights. The captioner lives only in `mm_projector` (as in the
    released file) and is handed to the tower's UNet call, so there is one copy of it.
    """

    def __init__(
        self,
        config: DiffLMMConfig,
        *,
        vae: AutoencoderKL | None = None,
        unet: UNet2DConditionModel | None = None,
        clip: CLIPVisionModel | None = None,
        language_model: LlamaForCausalLM | None = None,
    ):
        super().__init__()
        self.config = config
        self.vision_tower = SDCLIPVisionTower(config, vae=vae, unet=unet, clip=clip)
        self.mm_projector = SDCLIPBlock(
            clip_channels=config.clip["hidden_size"],
            xattn_channels=config.unet["cross_attention_dim"],
            sd_channels=config.sd_channels,
            sd_projected=config.sd_projected_channels,
            hidden=config.llama["hidden_size"],
            num_tokens=config.num_image_tokens,
        )
        self.language_model = (
            language_model
            if language_model is not None
            else LlamaForCausalLM(LlamaConfig(**config.llama))
        )
        self.language_model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector.vt_pe.dtype

    @property
    def device(self) -> torch.device:
        return self.mm_projector.vt_pe.device

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, stage=lambda name: nullcontext()) -> torch.Tensor:
        """(B, 3, R, R) pixel values -> (B, N, hidden) visual tokens, N = G*G in row-major patch
        order. stage(name): a context manager around each step ("clip", "vae", "unet",
        "projector"), for benchmarks that time them."""
        expected = (3, self.config.image_size, self.config.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"pixels must be (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(pixels.shape)}"
            )
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        tower = self.vision_tower
        with stage("clip"):
            clip_tokens = tower.clip_patch_tokens(pixels)
            caption = self.mm_projector.caption(clip_tokens)
        with stage("vae"):
            latents = tower.noisy_latents(pixels, tower.make_generator(pixels.device))
        with stage("unet"):
            features = tower.unet_features(latents, caption)
        with stage("projector"):
            return self.mm_projector(features, clip_tokens)


def build_difflmm(
    config: DiffLMMConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiffLMM:
    """A DiffLMM with random weights, created directly on `device` in `dtype` (no fp32 copy
    of a 7B model on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffLMM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def difflmm_backend(
    model: DiffLMM,
    tokenizer,
    *,
    conversation: str = "",
    compile: bool = False,
    graphs: bool | None = None,
) -> Backend:
    """DiffLMM behind the engine's backend protocol: LLaVA-style prompts (the template,
    pad-to-square preprocessing as the checkpoint's config records it) around the model's own
    encode_image, its language model answering. compile, graphs: Backend's."""
    model.eval()
    if model.device.type == "cuda":  # cuDNN's half-precision convolutions are fastest in NHWC
        model.vision_tower.to(memory_format=torch.channels_last)
    config = model.config
    lm = model.language_model
    prompts = LlavaPrompts(
        model,
        tokenizer,
        lm.get_input_embeddings(),
        grid=(config.grid, config.grid),
        image_size=config.image_size,
        preprocessing=config.preprocessing,
        conversation=conversation,
    )
    return Backend(
        lm,
        tokenizer,
        prompts,
        end_ids={tokenizer.eos_token_id},
        compile=compile,
        graphs=graphs,
    )
