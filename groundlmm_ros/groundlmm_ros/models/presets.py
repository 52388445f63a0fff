"""Models by name: build_engine("tiny-random"), build_engine("llava-1.5-7b"), or a path.

A preset is one row of PRESETS: how to build its backend, optionally a SAM
that comes with it (random tiny SAMs for tests), and engine option defaults.
Add a model by adding a row (and, for a directory format, a LOADERS entry
keyed by its config.json "model_type").
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.refiners import ColourRefiner, SamRefiner, ThresholdRefiner, load_sam
from groundlmm_ros.models import tiny
from groundlmm_ros.models.difflmm import tiny_difflmm_backend
from groundlmm_ros.models.difflmm_checkpoint import load_difflmm_backend, released_difflmm_backend
from groundlmm_ros.models.llava import LlavaBackend, load_llava

REFINERS = ("auto", "sam", "colour", "threshold")


@dataclass
class Preset:
    backend: Callable[[str, str, int], object]           # (device, dtype, seed) -> backend
    sam: Callable[[int], object] | None = None           # seed -> segment_anything Sam, when the preset ships one
    engine_options: dict = field(default_factory=dict)   # defaults for Engine(...)


def _tiny_llava(device: str, dtype: str, seed: int) -> LlavaBackend:
    tokenizer = tiny.tiny_tokenizer()
    model = tiny.tiny_llava(len(tokenizer), seed).to(device, getattr(torch, dtype))
    return LlavaBackend(model, tokenizer)


def _demo_difflmm(device: str, dtype: str, seed: int):
    from groundlmm_ros.training.recipe import demo_model_dir  # the shipped model's folder

    return load_difflmm_backend(str(demo_model_dir()), device=device, dtype=dtype)


PRESETS: dict[str, Preset] = {
    # The shipped demo model: a miniature DiffLMM trained here on synthetic scenes with captions
    # only (groundlmm_ros/model/MODEL_CARD.md). Mean-map subtraction: chosen on validation scenes.
    "demo": Preset(_demo_difflmm, engine_options={"normalise": False, "max_new_tokens": 40}),
    # Tiny random LLaVA + tiny random SAM: tests, CI, the node without weights.
    "tiny-random": Preset(_tiny_llava, sam=tiny.tiny_sam, engine_options={"max_new_tokens": 24}),
    # The paper's LLaVA-1.5 baseline from the local Hugging Face cache (offline).
    "llava-1.5-7b": Preset(lambda device, dtype, seed: load_llava("llava-hf/llava-1.5-7b-hf", device=device,
                                                                  dtype=dtype)),
    # Tiny random DiffLMM (same code as the 7B one) + tiny random SAM: tests, CI.
    "tiny-difflmm-random": Preset(tiny_difflmm_backend, sam=tiny.tiny_sam, engine_options={"max_new_tokens": 24}),
    # The released DiffLMM-7B from the local Hugging Face cache (adapter, Vicuna, SD v1.5, CLIP);
    # other directories: difflmm_checkpoint.released_difflmm_backend(adapter=..., base=..., sd=..., clip=...).
    "difflmm-7b": Preset(released_difflmm_backend),
}

# Model directories by config.json "model_type".
LOADERS: dict[str, Callable[..., object]] = {
    "llava": load_llava,
    "difflmm": load_difflmm_backend,
}


def _from_directory(path: str, device: str, dtype: str) -> tuple[object, dict]:
    """A model directory's backend (by config.json "model_type") and the engine defaults it
    carries: a directory written by `groundlmm train` records the mean-map setting its
    validation chose (extra.training.normalise); the paper's default (on) would ruin its maps."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory with config.json")
    with open(config_path) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise ValueError(f"{config_path}: model_type {model_type!r} has no loader (known: {', '.join(LOADERS)})")
    training = config.get("extra", {}).get("training", {})
    defaults = {"normalise": training["normalise"]} if "normalise" in training else {}
    return LOADERS[model_type](path, device=device, dtype=dtype), defaults


def build_engine(model: str, *, device: str = "cpu", dtype: str = "float32", refiner: str = "auto",
                 sam_checkpoint: str = "", sam_prompt: str = "point", seed: int = 0, **engine_options) -> Engine:
    """model: a PRESETS name or a model directory (its own engine defaults apply, then
    engine_options). refiner: "auto" (SAM when a checkpoint is
    given or the preset ships one, else the colour fallback), "sam", or a weight-free fallback: "colour"
    (ColourRefiner) or "threshold" (ThresholdRefiner)."""
    if refiner not in REFINERS:
        raise ValueError(f"refiner must be one of {REFINERS}, got {refiner!r}")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
    preset = PRESETS.get(model)
    if refiner == "sam" and not sam_checkpoint and not (preset and preset.sam):
        raise ValueError("refiner='sam' needs sam_checkpoint (a sam_vit_*.pth file)")
    if preset:
        backend, defaults = preset.backend(device, dtype, seed), preset.engine_options
    else:
        backend, defaults = _from_directory(model, device, dtype)

    sam = None
    if refiner in ("auto", "sam"):
        if sam_checkpoint:
            sam = load_sam(sam_checkpoint, device)
        elif preset and preset.sam:
            sam = preset.sam(seed).to(device)
    if sam is not None:
        chosen = SamRefiner(sam, sam_prompt)
    else:
        chosen = ThresholdRefiner() if refiner == "threshold" else ColourRefiner()

    return Engine(backend, chosen, seed=seed, **{**defaults, **engine_options})
