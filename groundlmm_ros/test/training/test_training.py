"""The demo model's training command runs end to end on a tiny budget (so it cannot rot),
and what it writes is a model directory the engine loads and runs in both modes."""

import json

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from diffusers import DDIMScheduler

from groundlmm_ros.engine.engine import GCG_QUESTION
from groundlmm_ros.models.difflmm import build_difflmm, difflmm_backend
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.training.recipe import Recipe, demo_config, demo_tokenizer
from groundlmm_ros.training.train import (
    TAGS,
    Budget,
    Progress,
    caption_batch,
    caption_tags,
    denoiser_target,
    tower_features,
    train_captioner,
    train_clip,
)
from groundlmm_ros.world import make_scenes

pytestmark = pytest.mark.slow


def tiny_demo_backend():
    tokenizer = demo_tokenizer()
    config = demo_config(len(tokenizer), recipe=Recipe(llama_layers=1, llama_width=32))
    return difflmm_backend(build_difflmm(config), tokenizer)


@pytest.mark.timeout(240)
def test_train_command_on_a_tiny_budget(tmp_path):
    budget = [
        "--scenes",
        "40",
        "--clip-steps",
        "2",
        "--clip-batch-size",
        "4",
        "--vae-steps",
        "2",
        "--denoiser-steps",
        "2",
        "--caption-steps",
        "3",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "3",
        "--validation-scenes",
        "2",
    ]

    def train(out):
        run = run_cli("train", "--output", str(out), *budget)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run

    out = tmp_path / "model"
    run = train(out)
    # Fixed seeds: a second run in a fresh process writes the same weights, bit for bit.
    train(tmp_path / "again")
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
    for stage in (
        "clip 2/2",
        "vae 2/2",
        "denoiser 2/2",
        "captioning 1/3",
        "validation step 3",
        "saved step 3",
    ):
        assert stage in run.stdout, f"no {stage!r} in the progress output"
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["budget"]["caption_steps"] == 3
    assert json.loads((out / "training.json").read_text()) == summary

    engine = build_engine(str(out), refiner="threshold")
    # The directory records what validation ran with, and the engine built from it uses that.
    assert (summary["combine"], summary["conversation"]) == ("mean", "vicuna_v1")
    assert (engine.normalise, engine.combine, engine.backend.prompts.conversation) == (
        summary["normalise"],
        "mean",
        "vicuna_v1",
    )
    assert engine.backend.prompts.preprocessing.pad_color == (127, 127, 127)
    scene = make_scenes(1, seed=5)[0]
    refer = engine.ground(scene.image, "the red circle", mode="refer")
    assert refer.answer == "the red circle" and len(refer.phrases) == 1
    assert refer.phrases[0].mask.shape == scene.image.shape[:2]
    describe = engine.ground(scene.image, GCG_QUESTION, mode="describe", max_new_tokens=5)
    assert 1 <= len(describe.token_ids) <= 5


def test_tokenizer_is_spacing_independent_and_round_trips():
    tokenizer = demo_tokenizer()
    caption = "there is a red circle, an orange star and the blue heart."
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == caption
    assert (
        tokenizer(" The  red\ncircle", add_special_tokens=False).input_ids
        == tokenizer("the red circle", add_special_tokens=False).input_ids
    )
    assert tokenizer("a red circle").input_ids[0] == tokenizer.bos_token_id
    assert np.unique(ids).size == len(set(caption.replace(",", " ,").replace(".", " .").split()))


@pytest.mark.parametrize("size,latent", [(64, 8), (128, 8), (64, 16), (128, 16)])
def test_recipe_sizes_keep_an_eight_by_eight_token_grid(size, latent):
    recipe = Recipe(
        image_size=size,
        latent_side=latent,
        latent_channels=8,
        prediction_type="sample",
        llama_layers=2,
        llama_width=64,
    )
    config = demo_config(len(demo_tokenizer()), recipe=recipe)
    assert (config.image_size, config.latent_size, config.grid) == (size, latent, 8)
    assert config.clip["patch_size"] == size // 8
    assert config.vae["latent_channels"] == config.unet["in_channels"] == 8
    assert config.scheduler["prediction_type"] == "sample"
    assert (config.llama["num_hidden_layers"], config.llama["hidden_size"]) == (2, 64)
    for bad in (
        {"image_size": 96},
        {"latent_side": 4},
        {"latent_channels": 3},
        {"prediction_type": "x0"},
        {"caption_order": "by size"},
        {"projector_lr_scale": -1.0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Recipe(**bad)


def test_left_to_right_captions_name_objects_by_their_x():
    backend = tiny_demo_backend()
    scenes = [s for s in make_scenes(30, seed=3) if len(s.objects) >= 3]
    rng = np.random.default_rng(0)
    _, rest, labels, _ = caption_batch(
        backend, scenes, np.arange(len(scenes)), rng, "left-to-right"
    )
    for scene, row in zip(scenes, labels):
        text = backend.tokenizer.decode(
            [i for i in row.tolist() if i >= 0], skip_special_tokens=True
        )
        by_x = sorted(scene.objects, key=lambda o: o.centre[0])
        positions = [text.index(o.name) for o in by_x]
        assert positions == sorted(positions), (text, [o.name for o in by_x])


def test_denoiser_target_follows_the_prediction_type():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert denoiser_target(scheduler, latents, noise, t) is noise
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample")
    assert denoiser_target(scheduler, latents, noise, t) is latents
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(
        denoiser_target(scheduler, latents, noise, t), alpha * noise - sigma * latents
    )


def test_projector_learning_rate_scale_zero_keeps_the_projector(tmp_path):
    backend = tiny_demo_backend()
    model = backend.prompts.encoder
    scenes = make_scenes(8, seed=4)
    pixels = torch.cat([backend.prompts.preprocess(s.image) for s in scenes])
    features, clips = tower_features(model, pixels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = Budget(caption_steps=2, batch_size=4, checkpoint_every=2, validation_scenes=1)
    recipe = Recipe(llama_layers=1, llama_width=32, projector_lr_scale=0.0)
    train_captioner(
        model, backend, scenes, features, clips, budget, recipe, tmp_path, Progress(), seed=0
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mm_projector."))
    assert any(
        not torch.equal(before[k], after[k]) for k in before if k.startswith("language_model.")
    )


def test_caption_tags_are_the_phrases_the_caption_says():
    tags = caption_tags("There is a red circle, the blue star and an orange heart.")
    assert {TAGS[i] for i in tags.nonzero().flatten()} == {
        "red circle",
        "blue star",
        "orange heart",
    }
    assert not caption_tags("a circle and the red.").any()


@pytest.mark.parametrize("tag_layer", ["last", "read"])
def test_clip_pretraining_learns_tags_and_touches_only_clip(tag_layer):
    """The tag loss must fall below what the tags' frequencies alone give (the image is
    looked at); the UNet and projector are left as they were, CLIP ends frozen. Tags on the
    read (penultimate) layer leave the last layer as it was: nothing after the read trains."""
    torch.manual_seed(0)
    backend = tiny_demo_backend()
    model = backend.prompts.encoder
    scenes = make_scenes(300, seed=4, max_objects=1)
    pixels = torch.cat([backend.prompts.preprocess(s.image) for s in scenes])
    captions = [s.caption for s in scenes]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    train_clip(
        model,
        pixels,
        captions,
        Budget(clip_steps=400, clip_batch_size=32),
        lambda message: losses.append(float(message.split()[-1])),
        tag_layer,
    )
    tags = torch.stack([caption_tags(c) for c in captions])
    rate = tags.mean(0).clamp(1e-6, 1 - 1e-6)
    blind = float(-(tags * rate.log() + (1 - tags) * (1 - rate).log()).mean())
    assert losses[-1] < 0.9 * blind, (losses, blind)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".clip." in k)
    last_layer = f".encoder.layers.{model.config.clip['num_hidden_layers'] - 1}."
    assert all(torch.equal(before[k], after[k]) for k in before if last_layer in k) == (
        tag_layer == "read"
    )
    assert all(torch.equal(before[k], after[k]) for k in before if ".clip." not in k)
    assert not model.vision_tower.clip.training
    assert not any(p.requires_grad for p in model.vision_tower.clip.parameters())
