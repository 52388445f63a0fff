"""Models by name: build_engine("tiny-random"), build_engine("llava-1.5-7b"), or a path.

A preset is one row of PRESETS: how to build its backend (or the directory it is),
optionally a SAM that comes with it (random tiny SAMs for tests), and the settings
in which it differs from the paper's defaults.
Add a model by adding a row (and, for a directory format, a LOADERS entry
keyed by its config.json "model_type").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.refiners import ColourRefiner, SamRefiner, ThresholdRefiner, load_sam
from groundlmm_ros.models import tiny
from groundlmm_ros.models.backend import CONVERSATIONS, PAPER_CONVERSATION
from groundlmm_ros.models.difflmm_checkpoint import (
    RELEASED_ADAPTER,
    RELEASED_BASE,
    RELEASED_CLIP,
    RELEASED_SD,
    load_difflmm_backend,
    released_difflmm_backend,
)
from groundlmm_ros.models.internvl import load_internvl, tiny_internvl_backend
from groundlmm_ros.models.llava import load_llava
from groundlmm_ros.models.llava_next import load_llava_next, tiny_llava_next_backend
from groundlmm_ros.models.qwen2_5_vl import load_qwen2_5_vl, tiny_qwen2_5_vl_backend
from groundlmm_ros.models.static_decode import DECODINGS

REFINERS = ("auto", "sam", "colour", "threshold")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# What a model directory written by `groundlmm train` records in config.json's extra.training.
RECORDED_SETTINGS = ("normalise", "combine", "conversation")


@dataclass
class Preset:
    """A model by name. `settings`: what the model carries that differs from the defaults
    (Engine options, such as its answer length, and "conversation", its prompt template).
    `about` and `needs` (what it needs on disk) are its row of docs/models.md."""

    about: str
    needs: str = "nothing"
    # (device, dtype, seed) -> backend
    backend: Callable[[str, torch.dtype, int], object] | None = None
    # or: the model is this directory (its loader and its recorded settings)
    directory: Callable[[], object] | None = None
    # seed -> segment_anything Sam, when the preset ships one
    sam: Callable[[int], object] | None = None
    settings: dict = field(default_factory=dict)


def demo_model_dir() -> Path:
    """Where the shipped demo model lives: groundlmm_ros/model/ in a source or editable
    checkout, share/groundlmm_ros/model/ in a colcon install (setup.py installs model/*)."""
    source = Path(__file__).resolve().parents[2] / "model"
    if (source / "config.json").is_file():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("groundlmm_ros")) / "model"
    except (ImportError, LookupError, OSError):  # no ament index, or the package is not in it
        return source


def hub(about: str, loader, repo_id: str, **settings) -> Preset:
    """A model from the local Hugging Face cache (offline): loader(repo_id, device=, dtype=)."""
    return Preset(
        about,
        f"`{repo_id}` in the Hugging Face cache",
        lambda device, dtype, seed: loader(repo_id, device=device, dtype=dtype),
        settings=settings,
    )


def tiny_random(family: str, backend) -> Preset:
    """A tiny random model built in code + tiny random SAM (tests, CI, the node without
    weights): short answers."""
    return Preset(
        f"random tiny {family} + tiny SAM, built in code: tests, CI",
        backend=backend,
        sam=tiny.tiny_sam,
        settings={"max_new_tokens": 24},
    )


# The paper generates its answers with up to 512 new tokens; the reference's scripts for the
# other families (aas/more_models/) with up to 1024.
PAPER_ANSWER_TOKENS = 512
REFERENCE_ANSWER_TOKENS = 1024
RELEASED_DIFFLMM = (RELEASED_ADAPTER, RELEASED_BASE, RELEASED_SD[0], RELEASED_CLIP)

PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "the shipped miniature DiffLMM, trained on synthetic scenes with captions only "
        "(`groundlmm_ros/model/MODEL_CARD.md`)",
        "nothing (in the repository)",
        directory=demo_model_dir,
        settings={"max_new_tokens": 40},
    ),
    "tiny-random": tiny_random("LLaVA", tiny.tiny_llava_backend),
    "llava-1.5-7b": hub(
        "LLaVA-1.5-7B, the paper's baseline",
        load_llava,
        "llava-hf/llava-1.5-7b-hf",
        max_new_tokens=PAPER_ANSWER_TOKENS,
    ),
    # Same code as the 7B one.
    "tiny-difflmm-random": tiny_random("DiffLMM", tiny.tiny_difflmm_backend),
    # Other directories: released_difflmm_backend(adapter=..., base=..., sd=..., clip=...).
    "difflmm-7b": Preset(
        "the released DiffLMM-7B",
        "in the Hugging Face cache: " + ", ".join(f"`{r}`" for r in RELEASED_DIFFLMM),
        released_difflmm_backend,
        settings={"max_new_tokens": PAPER_ANSWER_TOKENS},
    ),
    "tiny-qwen2.5-vl-random": tiny_random("Qwen2.5-VL", tiny_qwen2_5_vl_backend),
    # max_pixels 1008 * 1008 as the reference's aas/more_models/qwen2_5vl.py.
    "qwen2.5-vl-3b": hub(
        "Qwen2.5-VL-3B-Instruct",
        load_qwen2_5_vl,
        "Qwen/Qwen2.5-VL-3B-Instruct",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
    "qwen2.5-vl-7b": hub(
        "Qwen2.5-VL-7B-Instruct",
        load_qwen2_5_vl,
        "Qwen/Qwen2.5-VL-7B-Instruct",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
    "tiny-llava-next-random": tiny_random("LLaVA-NeXT", tiny_llava_next_backend),
    # The unpadded high-resolution map as the reference's aas/more_models/llava_next.py
    # (load_llava_next(use_base_patches=True): the base tile's 24 x 24 instead).
    "llava-next-mistral-7b": hub(
        "LLaVA-NeXT (1.6) Mistral 7B",
        load_llava_next,
        "llava-hf/llava-v1.6-mistral-7b-hf",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
    "llava-next-vicuna-7b": hub(
        "LLaVA-NeXT (1.6) Vicuna 7B",
        load_llava_next,
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
    "tiny-internvl-random": tiny_random("InternVL", tiny_internvl_backend),
    # transformers' native InternVL: 3 to 9 tiles and the tiles' map as the reference's
    # aas/more_models/internvl2_5.py.
    "internvl3-2b": hub(
        "InternVL3 2B",
        load_internvl,
        "OpenGVLab/InternVL3-2B-hf",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
    "internvl3-8b": hub(
        "InternVL3 8B",
        load_internvl,
        "OpenGVLab/InternVL3-8B-hf",
        max_new_tokens=REFERENCE_ANSWER_TOKENS,
    ),
}

# Model directories by config.json "model_type".
LOADERS: dict[str, Callable[..., object]] = {
    "llava": load_llava,
    "difflmm": load_difflmm_backend,
    "qwen2_5_vl": load_qwen2_5_vl,
    "llava_next": load_llava_next,
    "internvl": load_internvl,
}


def _from_directory(path: str, device: str, dtype: torch.dtype) -> tuple[object, dict]:
    """A model directory's backend (by config.json "model_type") and the settings it records
    (extra.training, written by `groundlmm train`: e.g. the mean-map setting its validation
    chose; the paper's default, on, would ruin the demo model's maps)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory with "
            "config.json"
        )
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} has no loader (known: {', '.join(LOADERS)})"
        )
    return LOADERS[model_type](path, device=device, dtype=dtype), recorded_settings(config)


def recorded_settings(config: dict) -> dict:
    """The settings a model directory's config.json records (extra.training)."""
    training = config.get("extra", {}).get("training", {})
    return {name: training[name] for name in RECORDED_SETTINGS if name in training}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """A DTYPES name -> torch dtype. "auto": half precision on CUDA (float16, as the reference
    runs the paper's models), float32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def build_engine(
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    conversation: str = "",
    decoding: str = "auto",
    refiner: str = "auto",
    sam_checkpoint: str = "",
    sam_prompt: str = "point",
    seed: int = 0,
    **engine_options,
) -> Engine:
    """model: a PRESETS name or a model directory. Its settings apply, then engine_options.
    conversation: a prompt template of CONVERSATIONS ("": the model's own; the paper's for the
    paper's models; models with their own chat template take none). decoding: a DECODINGS name
    ("auto": "graphs" on CUDA where the model allows it, "dynamic" elsewhere). refiner: "auto"
    (SAM when a checkpoint is given or the preset ships one, else the colour fallback), "sam",
    or a weight-free fallback: "colour" (ColourRefiner) or "threshold" (ThresholdRefiner)."""
    if refiner not in REFINERS:
        raise ValueError(f"refiner must be one of {REFINERS}, got {refiner!r}")
    dtype = resolve_dtype(dtype, device)
    requested_decoding = decoding
    if decoding == "auto":
        decoding = "graphs" if torch.device(device).type == "cuda" else "dynamic"
    if decoding not in DECODINGS:
        raise ValueError(
            f"decoding must be auto or one of {', '.join(DECODINGS)}, got {decoding!r}"
        )
    if decoding == "graphs" and torch.device(device).type != "cuda":
        raise ValueError("decoding 'graphs' needs a CUDA device")
    if conversation and conversation not in CONVERSATIONS:
        raise ValueError(
            f"conversation must be one of {', '.join(CONVERSATIONS)}, got {conversation!r}"
        )
    preset = PRESETS.get(model)
    if refiner == "sam" and not sam_checkpoint and not (preset and preset.sam):
        raise ValueError("refiner='sam' needs sam_checkpoint (a sam_vit_*.pth file)")
    if preset and preset.backend:
        backend, settings = preset.backend(device, dtype, seed), preset.settings
    else:
        backend, recorded = _from_directory(
            str(preset.directory()) if preset else model, device, dtype
        )
        settings = {**recorded, **(preset.settings if preset else {})}
    options = {**settings, **engine_options}
    chosen_conversation = conversation or options.pop("conversation", "")
    options.pop("conversation", None)
    if backend.conversation is None:  # the model's own chat template (models/chat_backend.py)
        if chosen_conversation:
            raise ValueError(
                f"{model} prompts with its own chat template; conversation {chosen_conversation!r} "
                "is a LLaVA v1 template"
            )
    else:
        backend.conversation = chosen_conversation or PAPER_CONVERSATION
    if decoding != "dynamic" and not backend.static_decoding:
        if requested_decoding != "auto":
            raise ValueError(f"{model} decodes dynamically only (its LM takes per-prompt inputs)")
        decoding = "dynamic"
    backend.decoding = decoding

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

    return Engine(backend, chosen, seed=seed, **options)
