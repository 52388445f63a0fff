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
from groundlmm_ros.engine.types import PAPER_ANSWER_TOKENS
from groundlmm_ros.models import tiny
from groundlmm_ros.models.difflmm_checkpoint import (
    RELEASED_ADAPTER,
    RELEASED_BASE,
    RELEASED_CLIP,
    RELEASED_SD,
    load_difflmm_backend,
    released_difflmm_backend,
)
from groundlmm_ros.models.internvl import load_internvl
from groundlmm_ros.models.llava import load_llava
from groundlmm_ros.models.llava_next import load_llava_next
from groundlmm_ros.models.llava_prompts import CONVERSATIONS
from groundlmm_ros.models.qwen2_5_vl import load_qwen2_5_vl
from groundlmm_ros.models.sam2_tracker import load_sam2_video, sam2_video_config, sam2_video_random

REFINERS = ("auto", "sam", "colour", "threshold")
DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILES = ("auto", "on", "off")
# What a model directory written by `groundlmm train` records in config.json's extra.training.
RECORDED_SETTINGS = ("normalise", "combine", "conversation")


@dataclass
class Preset:
    """A model by name. `settings`: what the model carries that differs from the defaults
    (Engine options, such as its answer length, and "conversation", its prompt template).
    `about` and `needs` (what it needs on disk) are its row of docs/models.md."""

    about: str
    needs: str = "nothing"
    # (device, dtype, seed, **backend options) -> backend
    backend: Callable[..., object] | None = None
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
    """A model from the local Hugging Face cache (offline): loader(repo_id, device=, dtype=,
    **backend options)."""
    return Preset(
        about,
        f"`{repo_id}` in the Hugging Face cache",
        lambda device, dtype, seed, **options: loader(
            repo_id, device=device, dtype=dtype, **options
        ),
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


# The reference's scripts for the other families (aas/more_models/) answer with up to 1024 new
# tokens (the paper's models: PAPER_ANSWER_TOKENS).
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
    "tiny-qwen2.5-vl-random": tiny_random("Qwen2.5-VL", tiny.tiny_qwen2_5_vl_backend),
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
    "tiny-llava-next-random": tiny_random("LLaVA-NeXT", tiny.tiny_llava_next_backend),
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
    "tiny-internvl-random": tiny_random("InternVL", tiny.tiny_internvl_backend),
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


def _from_directory(path: str, device: str, dtype: torch.dtype, **options) -> tuple[object, dict]:
    """A model directory's backend (by config.json "model_type", options: the backend's) and the
    other settings it records
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
    recorded = recorded_settings(config)
    # The template asked for, else the one the directory records.
    conversation = options.pop("conversation", "") or recorded.pop("conversation", "")
    recorded.pop("conversation", None)
    backend = LOADERS[model_type](
        path, device=device, dtype=dtype, conversation=conversation, **options
    )
    return backend, recorded


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
    compile: str = "auto",
    refiner: str = "auto",
    sam_checkpoint: str = "",
    sam_prompt: str = "point",
    seed: int = 0,
    **engine_options,
) -> Engine:
    """model: a PRESETS name or a model directory. Its settings apply, then engine_options.
    conversation: a prompt template of CONVERSATIONS ("": the model's own; the paper's for the
    paper's models; models with their own chat template take none). compile: the decoder's
    per-token step under torch.compile, a COMPILES name ("auto": on for CUDA). refiner: "auto"
    (SAM when a checkpoint is given or the preset ships one, else the colour fallback), "sam",
    or a weight-free fallback: "colour" (ColourRefiner) or "threshold" (ThresholdRefiner)."""
    if refiner not in REFINERS:
        raise ValueError(f"refiner must be one of {REFINERS}, got {refiner!r}")
    dtype = resolve_dtype(dtype, device)
    if compile not in COMPILES:
        raise ValueError(f"compile must be one of {', '.join(COMPILES)}, got {compile!r}")
    if conversation and conversation not in CONVERSATIONS:
        raise ValueError(
            f"conversation must be one of {', '.join(CONVERSATIONS)}, got {conversation!r}"
        )
    preset = PRESETS.get(model)
    if refiner == "sam" and not sam_checkpoint and not (preset and preset.sam):
        raise ValueError("refiner='sam' needs sam_checkpoint (a sam_vit_*.pth file)")
    settings = dict(preset.settings) if preset else {}
    backend_options = {
        "conversation": conversation or settings.pop("conversation", ""),
        "compile": compile == "on" or (compile == "auto" and torch.device(device).type == "cuda"),
    }
    if preset and preset.backend:
        backend = preset.backend(device, dtype, seed, **backend_options)
    else:
        backend, recorded = _from_directory(
            str(preset.directory()) if preset else model, device, dtype, **backend_options
        )
        settings = {**recorded, **settings}
    options = {**settings, **engine_options}

    sam = None
    if refiner in ("auto", "sam"):
        if sam_checkpoint:
            sam = load_sam(sam_checkpoint, device)
        elif preset and preset.sam:
            sam = preset.sam(seed).to(device)
    if sam is not None:
        chosen = SamRefiner(sam, sam_prompt, compile=backend_options["compile"])
    else:
        chosen = ThresholdRefiner() if refiner == "threshold" else ColourRefiner()

    return Engine(backend, chosen, seed=seed, **options)


@dataclass
class TrackerPreset:
    """A SAM 2 video model by name: where its released weights sit in the Hugging Face cache,
    and its size (the Hiera image encoder's Sam2HieraDetConfig fields; everything else of
    SAM 2.1 is the same at every size, transformers' Sam2VideoConfig defaults), so it can also
    be built with random weights where the weights are not on disk."""

    about: str
    repo_id: str
    hiera: dict
    image_size: int = 1024
    hidden: int = 256
    video: dict = field(default_factory=dict)


def hiera(width: int, heads: int, blocks: list[int], global_blocks: list[int], **more) -> dict:
    """Sam2HieraDetConfig fields of a Hiera: widths and heads double at every stage."""
    return dict(
        hidden_size=width,
        num_attention_heads=heads,
        blocks_per_stage=blocks,
        embed_dim_per_stage=[width * 2**i for i in range(4)],
        num_attention_heads_per_stage=[heads * 2**i for i in range(4)],
        global_attention_blocks=global_blocks,
        **more,
    )


# The released SAM 2.1 checkpoints (the sam2 repository's sam2.1_hiera_{t,s,b+,l}.yaml).
TRACKERS: dict[str, TrackerPreset] = {
    "sam2.1-tiny": TrackerPreset(
        "SAM 2.1 Hiera-T (38.9 M)",
        "facebook/sam2.1-hiera-tiny",
        hiera(96, 1, [1, 2, 7, 2], [5, 7, 9]),
    ),
    "sam2.1-small": TrackerPreset(
        "SAM 2.1 Hiera-S (46 M)",
        "facebook/sam2.1-hiera-small",
        hiera(96, 1, [1, 2, 11, 2], [7, 10, 13]),
    ),
    "sam2.1-base-plus": TrackerPreset(
        "SAM 2.1 Hiera-B+ (80.8 M)",
        "facebook/sam2.1-hiera-base-plus",
        hiera(
            112,
            2,
            [2, 3, 16, 3],
            [12, 16, 20],
            window_positional_embedding_background_size=[14, 14],
        ),
    ),
    "sam2.1-large": TrackerPreset(
        "SAM 2.1 Hiera-L (224.4 M)",
        "facebook/sam2.1-hiera-large",
        hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], window_size_per_stage=[8, 4, 16, 8]),
    ),
    # Built in code only: 64 px input; the memory attention needs a width above SAM 2's memory
    # channels (64), which transformers hard-codes. Weights drawn 10x wider than transformers'
    # 0.02: at 0.02 the object-score head gives ~0 and SAM 2 calls every object absent.
    "tiny-random": TrackerPreset(
        "random tiny SAM 2, built in code: tests, CI",
        "",
        hiera(
            16,
            1,
            [1, 1, 2, 1],
            [3],
            window_size_per_stage=[4, 4, 4, 2],
            window_positional_embedding_background_size=[2, 2],
        ),
        image_size=64,
        hidden=128,
        video=dict(
            memory_attention_num_layers=1,
            memory_attention_feed_forward_hidden_size=64,
            memory_fuser_intermediate_dim=64,
            initializer_range=0.2,
        ),
    ),
}


def build_sam2_video(
    name: str, device: str = "cpu", dtype: torch.dtype | None = None, random_weights: bool = False
):
    """(Sam2VideoModel, Sam2VideoProcessor) of a TRACKERS name or a local SAM 2 directory.
    random_weights: the preset's size with random weights (benchmarks; "tiny-random" always)."""
    preset = TRACKERS.get(name)
    if preset is None:
        if random_weights:
            raise ValueError(f"random weights need a TRACKERS name ({', '.join(TRACKERS)})")
        return load_sam2_video(name, device, dtype)
    if random_weights or not preset.repo_id:
        config = sam2_video_config(preset.hiera, preset.image_size, preset.hidden, **preset.video)
        return sam2_video_random(config, device, dtype)
    return load_sam2_video(preset.repo_id, device, dtype)
