"""DiffLMM built from configs: real shapes (on the meta device), the UNet feature hook,
seeded noise, the shared captioner, and the engine end to end on a tiny random model."""

import dataclasses

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.types import Grounding
from groundlmm_ros.models.difflmm import (
    DiffLMM,
    DiffLMMConfig,
    build_difflmm,
    difflmm_7b_config,
)
from groundlmm_ros.models.difflmm_checkpoint import load_difflmm, save_difflmm
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.models.tiny import tiny_difflmm_backend, tiny_difflmm_config

# The reference's SDCLIPBlock (llava/model/multimodal_projector/builder.py): the 14 tensors of
# non_lora_trainables.bin (after the prefix), 7B shapes.
RELEASED_PROJECTOR = {
    "clip_pe": (576, 768),
    "vt_pe": (576, 4096),
    "clip_projector.0.weight": (768, 1024),
    "clip_projector.0.bias": (768,),
    "clip_projector.2.weight": (768, 768),
    "clip_projector.2.bias": (768,),
    "sd_norm_layer.weight": (1280,),
    "sd_norm_layer.bias": (1280,),
    "sd_proj_layer.0.weight": (1024, 1280, 1, 1),
    "sd_proj_layer.0.bias": (1024,),
    "linear.0.weight": (4096, 2048),
    "linear.0.bias": (4096,),
    "linear.2.weight": (4096, 4096),
    "linear.2.bias": (4096,),
}


@pytest.fixture(scope="module")
def meta_7b():
    """The 7B model's structure without memory or compute."""
    return build_difflmm(difflmm_7b_config(), torch.bfloat16, "meta")


def test_7b_projector_has_the_released_tensor_names_and_shapes(meta_7b):
    shapes = {name: tuple(t.shape) for name, t in meta_7b.mm_projector.state_dict().items()}
    assert shapes == RELEASED_PROJECTOR
    assert sum(p.numel() for p in meta_7b.mm_projector.parameters()) == 30_667_776  # ~30.7M


def test_7b_shapes_follow_from_the_configs(meta_7b):
    config = meta_7b.config
    assert (config.latent_size, config.grid, config.num_image_tokens, config.sd_channels) == (
        48,
        24,
        576,
        1280,
    )
    tower, bf16 = meta_7b.vision_tower, dict(device="meta", dtype=torch.bfloat16)
    assert tower.vae.encode(torch.zeros(1, 3, 384, 384, **bf16)).latent_dist.mean.shape == (
        1,
        4,
        48,
        48,
    )
    clip_tokens = tower.clip_patch_tokens(torch.zeros(1, 3, 384, 384, **bf16))
    assert clip_tokens.shape == (1, 576, 1024)
    features = tower.unet_features(
        torch.zeros(1, 4, 48, 48, **bf16), torch.zeros(1, 576, 768, **bf16)
    )
    assert features.shape == (1, 1280, 24, 24)
    assert meta_7b.mm_projector(features, clip_tokens).shape == (1, 576, 4096)
    assert sum(p.numel() for p in meta_7b.language_model.parameters()) == 6_738_415_616  # Vicuna-7B


def test_grid_mismatch_between_unet_and_clip_is_refused():
    config = tiny_difflmm_config(100)
    with pytest.raises(ValueError, match="CLIP grid 4.0 .* UNet feature grid 8"):
        dataclasses.replace(config, clip={**config.clip, "patch_size": 8})
    with pytest.raises(ValueError, match="feature_block 3"):
        dataclasses.replace(config, feature_block=3)
    with pytest.raises(
        ValueError, match="image_size 36 must be divisible .* downsampling together \\(16\\)"
    ):
        dataclasses.replace(config, image_size=36)


def test_config_json_round_trip():
    config = tiny_difflmm_config(100, seed=7)
    assert DiffLMMConfig.from_json(config.to_json()) == config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_difflmm(tiny_difflmm_config(64))


def pixels(seed=0):
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_hook_reads_the_output_of_up_block_1_and_stops_the_unet(tiny):
    """The early-stopped features equal up_blocks[1]'s output in a full diffusers forward."""
    tower = tiny.vision_tower
    latents, caption = torch.randn(1, 4, 16, 16), torch.randn(1, 64, 16)
    full = {}
    handles = [
        tower.unet.up_blocks[1].register_forward_hook(
            lambda m, a, out: full.__setitem__("up1", out)
        ),
        tower.unet.up_blocks[2].register_forward_hook(
            lambda m, a, out: full.__setitem__("up2", out)
        ),
    ]
    with torch.no_grad():
        tower.unet(latents, 100, encoder_hidden_states=caption)
        for handle in handles:
            handle.remove()
        ran = []
        probe = tower.unet.up_blocks[2].register_forward_hook(lambda *a: ran.append(True))
        features = tower.unet_features(latents, caption)
        probe.remove()
    assert torch.equal(features, full["up1"]) and features.shape == (1, 32, 8, 8)
    assert not ran  # the blocks after the feature block never ran
    assert not tower.unet.up_blocks[1]._forward_hooks  # the hook is gone again


def test_fixed_seed_repeats_and_seed_matters(tiny):
    first, second = tiny.encode_image(pixels()), tiny.encode_image(pixels())
    assert torch.equal(first, second)
    reseeded = build_difflmm(dataclasses.replace(tiny.config, seed=1))
    reseeded.load_state_dict(tiny.state_dict())
    assert not torch.allclose(reseeded.encode_image(pixels()), first)


def test_an_image_gets_the_same_tokens_alone_or_anywhere_in_a_batch(tiny):
    batch = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        together = tiny.encode_image(batch)
        for i in range(3):
            torch.testing.assert_close(
                tiny.encode_image(batch[i : i + 1]), together[i : i + 1], atol=1e-5, rtol=1e-5
            )


def test_noise_level_is_the_configured_timestep(tiny):
    """add_noise at t: latents * sqrt(alpha_bar_t) + noise * sqrt(1 - alpha_bar_t)."""
    tower = tiny.vision_tower
    with torch.no_grad():
        noisy = tower.noisy_latents(pixels(), tower.make_generator(torch.device("cpu")))
        generator = tower.make_generator(torch.device("cpu"))
        latents = tower.vae.encode(pixels()).latent_dist.sample(generator) * 0.18215
        noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = tower.scheduler.alphas_cumprod[100]
    torch.testing.assert_close(noisy, latents * alpha_bar.sqrt() + noise * (1 - alpha_bar).sqrt())


def test_captioner_conditions_the_unet(tiny):
    """clip_projector + clip_pe is the UNet's cross-attention input: changing clip_pe
    changes the visual tokens through the UNet features."""
    model = build_difflmm(tiny.config)
    model.load_state_dict(tiny.state_dict())
    before = model.encode_image(pixels())
    with torch.no_grad():
        model.mm_projector.clip_pe.add_(1.0)
    assert not torch.allclose(model.encode_image(pixels()), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(tiny, dtype):
    model = build_difflmm(tiny.config, dtype)
    tokens = model.encode_image(pixels())
    assert tokens.dtype == dtype and torch.isfinite(tokens).all()


def test_wrong_pixel_shape_is_refused(tiny):
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 32, 32\)"):
        tiny.encode_image(torch.zeros(1, 3, 48, 48))


def scene(height, width, seed=0):
    return random_rgb(height, width, seed)


@pytest.mark.parametrize("refiner", ["sam", "threshold"])
def test_engine_describe_and_refer(refiner):
    engine = build_engine("tiny-difflmm-random", refiner=refiner)
    assert isinstance(engine.backend.prompts.encoder, DiffLMM) and engine.backend.prompts.grid == (
        8,
        8,
    )
    image = scene(45, 60)
    described = engine.ground(image, "Describe the image in detail.", "describe", max_new_tokens=12)
    # random words, but spaCy finds a chunk
    assert isinstance(described, Grounding) and described.phrases
    for phrase in described.phrases:
        assert phrase.mask.shape == (45, 60) and phrase.heatmap.shape == (45, 60)
        assert described.answer[phrase.char_start : phrase.char_end] == phrase.text
    again = engine.ground(image, "Describe the image in detail.", "describe", max_new_tokens=12)
    assert again.token_ids == described.token_ids and again.answer == described.answer

    referred = engine.ground(image, "the red mug on the table", "refer")
    assert referred.answer == "the red mug on the table" and len(referred.phrases) == 1
    phrase = referred.phrases[0]
    assert phrase.mask.shape == (45, 60) and 0 <= phrase.point[0] < 60 and 0 <= phrase.point[1] < 45
    assert phrase.mask.any()
    repeat = engine.ground(image, "the red mug on the table", "refer").phrases[0]
    assert repeat.point == phrase.point and np.array_equal(repeat.heatmap, phrase.heatmap)


def test_engine_loads_a_local_difflmm_directory(tmp_path):
    backend = tiny_difflmm_backend(seed=3)
    save_difflmm(backend.prompts.encoder, backend.tokenizer, tmp_path / "demo")
    engine = build_engine(str(tmp_path / "demo"), refiner="threshold")
    image = scene(32, 32, seed=1)
    expected = build_engine("tiny-difflmm-random", refiner="threshold", seed=3).ground(
        image, "the cup", "refer"
    )
    got = engine.ground(image, "the cup", "refer")
    assert got.phrases[0].point == expected.phrases[0].point
    np.testing.assert_array_equal(got.phrases[0].heatmap, expected.phrases[0].heatmap)


def test_a_trained_directory_brings_its_own_settings(tmp_path):
    """`groundlmm train` records the settings its validation used (mean map, combine, template);
    the node, eval and demo all build engines from a directory path, so build_engine applies
    them."""
    backend = tiny_difflmm_backend(seed=3)
    save_difflmm(backend.prompts.encoder, backend.tokenizer, tmp_path / "plain")
    backend.prompts.encoder.config.extra["training"] = {
        "step": 5,
        "normalise": False,
        "combine": "mean",
        "conversation": "vicuna_v1",
    }
    save_difflmm(backend.prompts.encoder, backend.tokenizer, tmp_path / "trained")
    plain = build_engine(str(tmp_path / "plain"), refiner="threshold")
    # the paper's
    assert (plain.normalise, plain.combine, plain.backend.prompts.conversation) == (
        True,
        "max",
        "llava_v1",
    )
    trained = build_engine(str(tmp_path / "trained"), refiner="threshold")
    assert (trained.normalise, trained.combine, trained.backend.prompts.conversation) == (
        False,
        "mean",
        "vicuna_v1",
    )
    overridden = build_engine(
        str(tmp_path / "trained"), refiner="threshold", normalise=True, conversation="llava_v1"
    )
    assert (overridden.normalise, overridden.backend.prompts.conversation) == (True, "llava_v1")


def test_the_shipped_demo_model_keeps_what_it_was_trained_with():
    """Trained on [-1, 1] pixels padded with grey, Vicuna's template, validated with mean combine
    and without the mean map: its directory says so, and the preset applies it."""
    engine = build_engine("demo", refiner="threshold")
    preprocessing = engine.backend.prompts.preprocessing
    assert (preprocessing.mean, preprocessing.std, preprocessing.pad_color) == (
        (0.5,) * 3,
        (0.5,) * 3,
        (127,) * 3,
    )
    assert (engine.normalise, engine.combine, engine.backend.prompts.conversation) == (
        False,
        "mean",
        "vicuna_v1",
    )
    assert engine.max_new_tokens == 40


def test_a_trained_scaling_factor_and_scheduler_setting_survive_save_and_load(tmp_path):
    # diffusers' from_config ignores stored values of keys that were defaults at creation
    # ("_use_default_values"); the demo model's VAE sets scaling_factor after training.
    backend = tiny_difflmm_backend(seed=3)
    tower = backend.prompts.encoder.vision_tower
    tower.vae.register_to_config(scaling_factor=0.54)
    backend.prompts.encoder.config.vae = dict(tower.vae.config)
    backend.prompts.encoder.config.scheduler = {
        **backend.prompts.encoder.config.scheduler,
        "prediction_type": "v_prediction",
    }
    save_difflmm(backend.prompts.encoder, backend.tokenizer, tmp_path / "m")
    model, _ = load_difflmm(tmp_path / "m")
    assert model.vision_tower.vae.config.scaling_factor == 0.54
    assert model.vision_tower.scheduler.config.prediction_type == "v_prediction"
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(
        model.encode_image(pixels), backend.prompts.encoder.encode_image(pixels)
    )
