"""The one training command of the demo model: captions only, no masks, boxes or points.

Stages (all seeded; each prints its progress):
  0. CLIP: the CLIP stand-in learns from the captions what its patches show (train_clip;
     run right after stage 1, from which it is independent).
  1. VAE: a small AutoencoderKL learns to reconstruct the scenes (its encoder is
     DiffLMM's latent space; the decoder is dropped afterwards, as in DiffLMM).
  2. Denoiser: the UNet learns to denoise those latents (epsilon prediction by default,
     Recipe.prediction_type), conditioned on the
     implicit captioner (clip_projector + clip_pe over the frozen CLIP patch tokens),
     which trains with it. Both are then frozen.
  3. The frozen tower's features are computed once per training scene, exactly as
     DiffLMM.encode_image computes them (seeded noise at t=100, shared by the batch, so a
     scene's features are the node's; the UNet block that gives the 8 x 8 grid).
  4. Captioning: projector (sd_norm_layer, sd_proj_layer, linear, vt_pe) and the Llama
     learn to answer "Describe the image in detail." with the scene's caption (object
     order reshuffled every time). Every `checkpoint_every` steps the model is scored on
     validation scenes (refer pointing, through the real Engine) and the best so far is
     saved, so a partial run is usable and a late decline does not overwrite a good model.

Deviations from DiffLMM's own recipe. Its CLIP ViT-L comes pre-trained on 400M captioned
images and its patch tokens know what lies in their patch; a random stand-in's do not (the
probe in bench/shape_probe.py), and an LMM trained on them names shapes badly. So stage 0
pre-trains the stand-in on the training captions, with image-level tags instead of CLIP's
contrastive loss (which, at this scale, did not teach the tokens shape).
For the CPU budget: the captioner is trained in
stage 2 with the denoiser instead of in stage 4 with the projector, so stage 4 never
backpropagates through the UNet and the tower runs once per scene instead of per step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from groundlmm_ros.engine.engine import GCG_QUESTION, Engine
from groundlmm_ros.engine.refiners import ColourRefiner
from groundlmm_ros.evaluation import evaluate
from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.difflmm import CLIP_READ_LAYER, DiffLMM, difflmm_backend, explicit
from groundlmm_ros.models.difflmm_checkpoint import save_difflmm
from groundlmm_ros.training.recipe import (
    DEMO_COMBINE,
    DEMO_CONVERSATION,
    QUESTIONS,
    SCENE_SIZE,
    Recipe,
    demo_config,
    demo_tokenizer,
)
from groundlmm_ros.world import COLOURS, SHAPES, make_scenes
from groundlmm_ros.world.scenes import caption_for

TRAIN_SEED = 1  # scene stream of training (evaluation.EVAL_SEED is the held-out one)
VALIDATION_SEED = 2  # scenes that choose the checkpoint; never the held-out evaluation scenes


@dataclass
class Budget:
    scenes: int = 16000
    clip_steps: int = 8000
    clip_batch_size: int = 128
    vae_steps: int = 200
    denoiser_steps: int = 400
    caption_steps: int = 4000
    batch_size: int = 32
    checkpoint_every: int = 250
    validation_scenes: int = 80


class Progress:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def update(
    optimiser,
    loss: torch.Tensor,
    log: Progress,
    stage: str,
    step: int,
    total: int,
    every: int,
    clip_norm_of: list | None = None,
) -> None:
    """One optimiser step on loss (gradients clipped to norm 1 over clip_norm_of when given);
    the loss is logged every `every` steps and at the last."""
    optimiser.zero_grad()
    loss.backward()
    if clip_norm_of is not None:
        torch.nn.utils.clip_grad_norm_(clip_norm_of, 1.0)
    optimiser.step()
    if step % every == 0 or step == total - 1:
        log(f"{stage} {step + 1}/{total} loss {loss.item():.4f}")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    )


TAGS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def caption_tags(caption: str) -> torch.Tensor:
    """(len(TAGS),) 0/1: which "<colour> <shape>" phrases the caption says (a bigram match
    over the world's words: these captions have no other structure to parse)."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    said = {f"{a} {b}" for a, b in zip(words, words[1:])}
    return torch.tensor([float(tag in said) for tag in TAGS])


def train_clip(
    model: DiffLMM,
    pixels: torch.Tensor,
    captions: list[str],
    budget: Budget,
    log: Progress,
    tag_layer: str,
) -> None:
    """The CLIP stand-in learns which caption phrases (tags) its image has, each tag scored
    by its best patch token (multiple-instance learning): every token learns what lies
    around it, and nothing says where. No mask, box or point. tag_layer (Recipe.tag_layer):
    "read" scores the penultimate tokens DiffLMM reads (the last layer idles), so the tag of
    an object lands in its own tokens; "last" scores the last layer's, one attention layer
    further, which leaves the read tokens a mix of their neighbours (the earlier model)."""
    clip = model.vision_tower.clip
    with torch.no_grad():
        clip_pixels = torch.cat(
            [model.vision_tower.clip_inputs(pixels[s]) for s in batches(len(pixels), 512)]
        )
    tags = torch.stack([caption_tags(c) for c in captions]).to(pixels.device)  # (n, T)
    # Dropped after this stage.
    head = torch.nn.Sequential(
        torch.nn.LayerNorm(clip.config.hidden_size),
        torch.nn.Linear(clip.config.hidden_size, len(TAGS)),
    ).to(pixels.device)
    trained = list(clip.parameters()) + list(head.parameters())
    clip.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.05)
    for step in range(budget.clip_steps):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, budget.clip_steps, 1e-3, warmup=100)
        index = torch.randint(len(pixels), (budget.clip_batch_size,), device=pixels.device)
        hidden = clip(pixel_values=clip_pixels[index], output_hidden_states=True).hidden_states
        tokens = hidden[-1 if tag_layer == "last" else CLIP_READ_LAYER][:, 1:]  # (B, N, C_clip)
        # The best patch per tag.
        loss = F.binary_cross_entropy_with_logits(head(tokens).amax(dim=1), tags[index])
        update(optimiser, loss, log, "clip", step, budget.clip_steps, every=100)
    clip.eval().requires_grad_(False)


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, budget: Budget, log: Progress) -> None:
    """Reconstruction + a light KL; afterwards scaling_factor makes the latents unit-variance
    (SD's role of 0.18215)."""
    vae.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(budget.vae_steps):
        x = pixels[torch.randint(len(pixels), (budget.batch_size,))]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        update(optimiser, loss, log, "vae", step, budget.vae_steps, every=50)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat(
            [vae.encode(pixels[s]).latent_dist.mean for s in batches(min(len(pixels), 512), 128)]
        ).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))


def train_denoiser(model: DiffLMM, pixels: torch.Tensor, budget: Budget, log: Progress) -> None:
    """UNet + implicit captioner as a denoiser over all timesteps (target: the scheduler's
    prediction_type)."""
    tower, captioner = model.vision_tower, model.mm_projector
    with torch.no_grad():
        clip_tokens = torch.cat(
            [tower.clip_patch_tokens(pixels[s]) for s in batches(len(pixels), 256)]
        )
        latents = torch.cat(
            [tower.vae.encode(pixels[s]).latent_dist.sample() for s in batches(len(pixels), 256)]
        )
        latents = latents * tower.vae.config.scaling_factor  # (n, 4, L, L)
    trained = (
        list(tower.unet.parameters())
        + list(captioner.clip_projector.parameters())
        + [captioner.clip_pe]
    )
    for p in trained:
        p.requires_grad_(True)
    tower.unet.train()
    optimiser = torch.optim.AdamW(trained, lr=1e-3)
    n_timesteps = tower.scheduler.config.num_train_timesteps
    for step in range(budget.denoiser_steps):
        index = torch.randint(len(pixels), (budget.batch_size,))
        noise = torch.randn_like(latents[index])
        t = torch.randint(n_timesteps, (len(index),), device=latents.device)
        noisy = tower.scheduler.add_noise(latents[index], noise, t)
        prediction = tower.unet(
            noisy, t, encoder_hidden_states=captioner.caption(clip_tokens[index])
        ).sample
        loss = F.mse_loss(prediction, denoiser_target(tower.scheduler, latents[index], noise, t))
        update(optimiser, loss, log, "denoiser", step, budget.denoiser_steps, every=50)
    tower.unet.eval()
    for p in trained:
        p.requires_grad_(False)


def denoiser_target(scheduler, latents, noise, t):
    """What the UNet predicts, by the scheduler's prediction_type (as diffusers' training
    scripts)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unknown prediction_type {kind!r}")


@torch.no_grad()
def tower_features(model: DiffLMM, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen tower's outputs, as DiffLMM.encode_image computes them:
    (n, C_sd, G, G) UNet features and (n, N, C_clip) CLIP patch tokens."""
    tower, projector = model.vision_tower, model.mm_projector
    features, clips = [], []
    for s in batches(len(pixels), 64):
        clip_tokens = tower.clip_patch_tokens(pixels[s])
        latents = tower.noisy_latents(pixels[s], tower.make_generator(pixels.device))
        features.append(tower.unet_features(latents, projector.caption(clip_tokens)))
        clips.append(clip_tokens)
    return torch.cat(features), torch.cat(clips)


def caption_batch(
    backend: Backend, scenes, index: np.ndarray, rng: np.random.Generator, order: str
):
    """Token tensors of one batch: (B, a) prompt ids before the image, and (B, r) ids after it
    (rest of the prompt + caption + </s>, right-padded) with their (B, r) labels (-100 where
    no loss) and (B, r) attention mask. order: Recipe.caption_order."""
    tokenizer = backend.tokenizer
    rests, labels = [], []
    for i in index:
        objects = scenes[i].objects
        if order == "random":
            objects = [objects[k] for k in rng.permutation(len(objects))]
        else:
            objects = sorted(objects, key=lambda o: o.centre[0])
        # ids_before (the system line and "USER:") is the same for every question.
        ids_before, ids_after = backend.prompts.prompt_ids(QUESTIONS[rng.integers(len(QUESTIONS))])
        answer = tokenizer(caption_for(objects, rng), add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id
        ]
        rests.append(ids_after + answer)
        labels.append([-100] * len(ids_after) + answer)
    width = max(map(len, rests))
    pad = tokenizer.pad_token_id
    rest = torch.tensor([r + [pad] * (width - len(r)) for r in rests])
    label = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rests])
    return torch.tensor([ids_before] * len(index)), rest, label, mask


def validate(backend: Backend, validation, normalise: bool) -> dict:
    engine = Engine(
        backend, ColourRefiner(), normalise=normalise, combine=DEMO_COMBINE, max_new_tokens=40
    )
    return evaluate(engine, validation, GCG_QUESTION)


def train_captioner(
    model: DiffLMM,
    backend: Backend,
    scenes,
    features,
    clips,
    budget: Budget,
    recipe: Recipe,
    output: Path,
    log: Progress,
    seed: int,
) -> dict:
    """Projector + Llama on captions; returns the validation metrics of the saved checkpoint."""
    projector, lm = model.mm_projector, model.language_model
    projected = [
        p
        for name, p in projector.named_parameters()
        if not name.startswith(("clip_projector", "clip_pe"))
    ]
    language = list(lm.parameters())
    trained = projected + language
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(
        [
            {"params": projected, "scale": recipe.projector_lr_scale},
            {"params": language, "scale": 1.0},
        ],
        lr=1e-3,
        weight_decay=0.0,
    )
    rng = np.random.default_rng(seed)
    validation = make_scenes(budget.validation_scenes, seed=VALIDATION_SEED, size=SCENE_SIZE)
    embed = lm.get_input_embeddings()
    best: dict = {"score": -1.0}
    for step in range(budget.caption_steps):
        lm.train()
        for group in optimiser.param_groups:
            group["lr"] = group["scale"] * cosine_lr(step, budget.caption_steps, 1e-3, warmup=100)
        index = rng.integers(len(scenes), size=budget.batch_size)
        before, rest, labels, mask = (
            t.to(features.device)
            for t in caption_batch(backend, scenes, index, rng, recipe.caption_order)
        )
        visual = projector(features[index], clips[index])  # (B, N, hidden)
        embeds = torch.cat([embed(before), visual, embed(rest)], dim=1)  # (B, a + N + r, hidden)
        n_prefix = before.shape[1] + visual.shape[1]
        attention = torch.cat([mask.new_ones(len(index), n_prefix), mask], dim=1)
        targets = torch.cat([labels.new_full((len(index), n_prefix), -100), labels], dim=1)
        loss = lm(inputs_embeds=embeds, attention_mask=attention, labels=targets).loss
        update(
            optimiser,
            loss,
            log,
            "captioning",
            step,
            budget.caption_steps,
            every=25,
            clip_norm_of=trained,
        )
        if (step + 1) % budget.checkpoint_every == 0 or step == budget.caption_steps - 1:
            lm.eval()
            scores = {
                normalise: validate(backend, validation, normalise) for normalise in (False, True)
            }
            for normalise, metrics in scores.items():
                log(
                    f"validation step {step + 1} normalise={normalise}: refer pointing "
                    f"{metrics['refer_pointing_accuracy']:.3f}, "
                    f"describe recall {metrics['describe_mask_recall']:.3f}"
                )
            normalise = max(scores, key=lambda k: scores[k]["refer_pointing_accuracy"])
            metrics = scores[normalise]
            score = metrics["refer_pointing_accuracy"] + metrics["describe_mask_recall"]
            if score > best["score"]:
                best = {
                    "score": score,
                    "step": step + 1,
                    "normalise": normalise,
                    "combine": DEMO_COMBINE,
                    "conversation": DEMO_CONVERSATION,
                    "validation": metrics,
                }
                model.config.extra["training"] = {k: v for k, v in best.items() if k != "score"}
                save_difflmm(model, backend.tokenizer, output)
                log(f"saved step {step + 1} to {output} (normalise={normalise})")
    return best


def train(
    output: str | Path,
    budget: Budget = Budget(),
    recipe: Recipe = Recipe(),
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """Run every stage; the best checkpoint lands in `output` (config.json, model.safetensors,
    tokenizer). Returns a summary (also written into config.json's extra.training).
    The shipped model is trained on the CPU; device="cuda" runs the same recipe on a GPU
    (results then differ in the last bits, so checkpoints differ too)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    log = Progress()
    output = Path(output)
    tokenizer = demo_tokenizer()
    config = demo_config(len(tokenizer), seed, recipe)
    log(
        f"{budget.scenes} training scenes (seed {TRAIN_SEED}), budget {asdict(budget)}, "
        f"recipe {asdict(recipe)}"
    )
    scenes = make_scenes(budget.scenes, seed=TRAIN_SEED, size=SCENE_SIZE)
    # (n, 3, R, R)
    pixels = torch.cat(
        [config.preprocessing.pixel_values(s.image, config.image_size) for s in scenes]
    ).to(device)
    vae = AutoencoderKL.from_config(explicit(config.vae)).to(device)
    train_vae(vae, pixels, budget, log)
    config.vae = dict(vae.config)
    model = DiffLMM(config, vae=vae).to(device)  # drops the decoder; tower frozen, eval mode
    backend = difflmm_backend(model, tokenizer, conversation=DEMO_CONVERSATION)
    train_clip(model, pixels, [s.caption for s in scenes], budget, log, recipe.tag_layer)
    train_denoiser(model, pixels, budget, log)
    log("computing the frozen tower's features of every training scene")
    features, clips = tower_features(model, pixels)
    best = train_captioner(
        model, backend, scenes, features, clips, budget, recipe, output, log, seed
    )
    summary = {
        "seconds": round(log.elapsed),
        "budget": asdict(budget),
        "recipe": asdict(recipe),
        "seed": seed,
        "threads": threads,
        "device": device,
        **{k: v for k, v in best.items() if k != "score"},
    }
    (output / "training.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {log.elapsed:.0f} s; best validation {json.dumps(best)}")
    return summary
