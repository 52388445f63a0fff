"""Loading DiffLMM weights from disk, in two layouts.

The RELEASED layout (docs/method.md, section 2), as users have it:
    adapter_dir/  config.json (LLaVA fields), adapter_config.json,
                  adapter_model.safetensors or adapter_model.bin (peft LoRA),
                  non_lora_trainables.bin (the SDCLIPBlock,
                      keys base_model.model.model.mm_projector.*)
    base_dir/     Vicuna-7B v1.5 (transformers layout + tokenizer)
    sd_dir/       Stable Diffusion v1.5 (diffusers layout: vae/, unet/, scheduler/)
    clip_dir/     CLIP ViT-L/14-336 (transformers layout)
Order as in the reference: base LLM, LoRA merged with peft, vocabulary grown if
`mm_use_im_patch_token` asks for it, then the projector block.

The LOCAL layout (small self-made models such as the shipped demo):
    dir/  config.json (DiffLMMConfig), model.safetensors, tokenizer files.

Everything pickled loads with weights_only=True; every failure is a CheckpointError
naming the file (and the tensor, where one is at fault).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_model
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
)

from groundlmm_ros.models.backend import Backend
from groundlmm_ros.models.difflmm import DiffLMM, DiffLMMConfig, build_difflmm, difflmm_backend

# The released checkpoint and its components on the Hugging Face hub; used from the local
# cache only (the node never downloads). SD v1.5 moved from runwayml to its own org in 2024.
RELEASED_ADAPTER = "Shengcao1006/difflmm-llava-v1.5-7b-lora"
RELEASED_BASE = "lmsys/vicuna-7b-v1.5"
RELEASED_SD = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
RELEASED_CLIP = "openai/clip-vit-large-patch14-336"

NON_LORA_FILE = "non_lora_trainables.bin"
PROJECTOR_PREFIX = "model.mm_projector."  # what the reference's key mapping leaves
IM_PATCH_TOKEN = "<im_patch>"  # the reference's DEFAULT_IMAGE_PATCH_TOKEN


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"missing file: {path}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(_require(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat dict of tensors from .safetensors, or from a pickle with weights_only=True
    (a pickle that would run code is refused by torch's restricted unpickler)."""
    _require(path)
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe = re.search(r"GLOBAL (\S+)", str(err))  # what torch's restricted unpickler refused
        reason = (
            f"the pickle calls {unsafe.group(1)}, not plain tensors"
            if unsafe
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise CheckpointError(
            f"{path}: corrupt, truncated or unsafe checkpoint, refused ({reason})"
        ) from err
    if not isinstance(tensors, dict) or not all(
        isinstance(v, torch.Tensor) for v in tensors.values()
    ):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    return tensors


def check_tensors(
    path: Path, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Same names and shapes, or a CheckpointError naming the first tensors at fault."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, want in expected.items():
        if found[name].shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(found[name].shape)}, "
                f"the model needs {tuple(want.shape)}"
            )


def _config_field(path: Path, config: dict, name: str):
    if name not in config:
        raise CheckpointError(f"{path}: field {name!r} missing")
    return config[name]


def _expect_field(path: Path, config: dict, name: str, expected) -> None:
    value = _config_field(path, config, name)
    if value != expected:
        raise CheckpointError(
            f"{path}: {name} is {value!r}; only {expected!r} (the released DiffLMM) is supported"
        )


def _from_pretrained(what: Path, loader, ignore_unexpected: bool = False, **kwargs):
    """A library's from_pretrained, with its failures turned into CheckpointErrors naming the
    directory. from_pretrained only warns about missing weights (and fills them at random):
    those are refused here too."""
    try:
        model, info = loader(str(what), output_loading_info=True, **kwargs)
    except Exception as err:
        raise CheckpointError(f"{what}: could not load ({type(err).__name__}: {err})") from err
    problems = {
        "missing": info.get("missing_keys", []),
        "mismatched": info.get("mismatched_keys", []),
    }
    if not ignore_unexpected:
        problems["unexpected"] = info.get("unexpected_keys", [])
    for kind, keys in problems.items():
        keys = sorted(map(str, keys))
        if keys:
            raise CheckpointError(
                f"{what}: {kind} tensor(s) {keys[:5]}{' ...' if len(keys) > 5 else ''}"
            )
    return model


def released_config(
    adapter_dir: Path, base_dir: Path, sd_dir: Path, clip_dir: Path, seed: int = 0
) -> DiffLMMConfig:
    """The DiffLMMConfig of a released checkpoint: component configs from their directories,
    DiffLMM's fields from adapter_dir/config.json, every cross-check spelled out."""
    path = adapter_dir / "config.json"
    llava = _read_json(path)
    _expect_field(path, llava, "mm_projector_type", "SDCLIPBlock")
    _expect_field(path, llava, "mm_vision_sd_concat_clip", True)
    _expect_field(path, llava, "mm_vision_sd_implicit_caption", True)
    _expect_field(path, llava, "mm_vision_sd_ensemble_size", 1)
    _expect_field(path, llava, "image_aspect_ratio", "pad")
    if llava.get("mm_use_im_start_end", False):
        raise CheckpointError(f"{path}: mm_use_im_start_end true is not supported")
    config = DiffLMMConfig(
        unet=UNet2DConditionModel.load_config(
            str(_require(sd_dir / "unet" / "config.json").parent)
        ),
        vae=AutoencoderKL.load_config(str(_require(sd_dir / "vae" / "config.json").parent)),
        scheduler=_read_json(sd_dir / "scheduler" / "scheduler_config.json"),
        clip=CLIPVisionConfig.from_pretrained(
            str(_require(clip_dir / "config.json").parent)
        ).to_dict(),
        llama=LlamaConfig.from_pretrained(str(_require(base_dir / "config.json").parent)).to_dict(),
        image_size=_config_field(path, llava, "mm_vision_resolution"),
        timestep=_config_field(path, llava, "mm_vision_sd_timestep"),
        feature_block=_config_field(path, llava, "mm_vision_select_layer"),
        seed=seed,
    )
    mm_hidden = _config_field(path, llava, "mm_hidden_size")
    checks = {
        "mm_vision_sd_pe": (llava.get("mm_vision_sd_pe"), config.num_image_tokens),
        "mm_vision_sd_clip_proj_in": (
            llava.get("mm_vision_sd_clip_proj_in"),
            config.clip["hidden_size"],
        ),
        "mm_vision_sd_clip_proj_out": (
            llava.get("mm_vision_sd_clip_proj_out"),
            config.unet["cross_attention_dim"],
        ),
        "mm_hidden_size[select_layer]": (
            mm_hidden[config.feature_block] if isinstance(mm_hidden, list) else mm_hidden,
            config.sd_channels,
        ),
        "mm_hidden_size[-1]": (
            mm_hidden[-1] if isinstance(mm_hidden, list) else mm_hidden,
            config.clip["hidden_size"],
        ),
        "hidden_size": (llava.get("hidden_size"), config.llama["hidden_size"]),
    }
    for name, (found, needed) in checks.items():
        if found != needed:
            raise CheckpointError(
                f"{path}: {name} is {found!r} but the component configs give {needed!r}"
            )
    return config


def _adapter_weights(adapter_dir: Path) -> Path:
    """peft writes adapter_model.safetensors; the peft of the release's era wrote
    adapter_model.bin."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).exists():
            return adapter_dir / name
    raise CheckpointError(
        f"missing file: {adapter_dir}/adapter_model.safetensors (or adapter_model.bin)"
    )


def _merge_lora(llm: LlamaForCausalLM, adapter_dir: Path) -> LlamaForCausalLM:
    """Adds the adapter's LoRA modules with peft, loads its weights (checked name by name
    against what peft expects) and merges them into the base weights."""
    lora_config = LoraConfig.from_pretrained(
        str(_require(adapter_dir / "adapter_config.json").parent)
    )
    weights_path = _adapter_weights(adapter_dir)
    weights = load_tensor_file(weights_path)
    peft_model = get_peft_model(llm, lora_config)
    check_tensors(weights_path, weights, get_peft_model_state_dict(peft_model))
    set_peft_model_state_dict(peft_model, weights)
    return peft_model.merge_and_unload()


def _add_im_patch_token(llm: LlamaForCausalLM, tokenizer) -> None:
    """The reference adds <im_patch> when config.json lacks mm_use_im_patch_token (its default
    is True), so such a model has one more vocabulary row. The new rows are set to the mean
    of the old ones (deterministic; transformers' default samples them at random)."""
    old = llm.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([IM_PATCH_TOKEN], special_tokens=True)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            weight[old:] = weight[:old].mean(0)


def load_released_difflmm(
    adapter_dir,
    base_dir,
    sd_dir,
    clip_dir,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """The released DiffLMM from its four directories -> (DiffLMM, tokenizer), eval mode."""
    adapter_dir, base_dir, sd_dir, clip_dir = map(Path, (adapter_dir, base_dir, sd_dir, clip_dir))
    config = released_config(adapter_dir, base_dir, sd_dir, clip_dir, seed=seed)
    llava = _read_json(adapter_dir / "config.json")
    # Fail on a missing adapter file before the minutes spent loading the 7B base model.
    non_lora_path = _require(adapter_dir / NON_LORA_FILE)
    _require(adapter_dir / "adapter_config.json")
    _adapter_weights(adapter_dir)

    llm = _from_pretrained(base_dir, LlamaForCausalLM.from_pretrained, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as err:
        raise CheckpointError(
            f"{base_dir}: could not load the tokenizer ({type(err).__name__}: {err})"
        ) from err
    llm = _merge_lora(llm, adapter_dir)
    if llava.get("mm_use_im_patch_token", True):
        _add_im_patch_token(llm, tokenizer)
        config.llama = llm.config.to_dict()

    vae = _from_pretrained(sd_dir / "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype)
    unet = _from_pretrained(
        sd_dir / "unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype
    )
    # A full CLIP checkpoint also holds the text tower: those tensors are unused, not an error.
    clip = _from_pretrained(
        clip_dir, CLIPVisionModel.from_pretrained, ignore_unexpected=True, dtype=dtype
    )

    model = DiffLMM(config, vae=vae, unet=unet, clip=clip, language_model=llm)
    model.mm_projector.to(dtype)
    model.mm_projector.load_state_dict(load_non_lora_trainables(non_lora_path, model))
    return model.to(device).eval(), tokenizer


def load_non_lora_trainables(path: Path, model: DiffLMM) -> dict[str, torch.Tensor]:
    """non_lora_trainables.bin -> the SDCLIPBlock's state dict. Key mapping as in the
    reference: strip 'base_model.', then one leading 'model.' if keys start 'model.model.';
    what remains is 'model.mm_projector.<name>'."""
    raw = load_tensor_file(path)
    keys = {
        (k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in raw.items()
    }
    if any(k.startswith("model.model.") for k in keys):
        keys = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in keys.items()}
    outside = sorted(k for k in keys if not k.startswith(PROJECTOR_PREFIX))
    if outside:
        raise CheckpointError(f"{path}: tensor(s) outside {PROJECTOR_PREFIX}*: {outside[:5]}")
    found = {k[len(PROJECTOR_PREFIX) :]: v for k, v in keys.items()}
    expected = model.mm_projector.state_dict()
    check_tensors(path, found, expected)
    return {k: v.to(expected[k].dtype) for k, v in found.items()}


def save_difflmm(model: DiffLMM, tokenizer, directory) -> None:
    """The local layout: config.json (DiffLMMConfig), model.safetensors, tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(model.config.to_json())
    save_model(model, str(directory / "model.safetensors"))  # handles tied embeddings
    tokenizer.save_pretrained(str(directory))


def load_difflmm(directory, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A model saved by save_difflmm -> (DiffLMM, tokenizer), eval mode."""
    directory = Path(directory)
    try:
        config = DiffLMMConfig.from_json(_require(directory / "config.json").read_text())
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: not a DiffLMMConfig ({err})") from err
    weights = _require(directory / "model.safetensors")
    model = build_difflmm(config, dtype=dtype, device=device)
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except Exception as err:
        raise CheckpointError(
            f"{weights}: does not fit the model in config.json ({type(err).__name__}: {err})"
        ) from err
    try:
        # An empty config: config.json here is a DiffLMMConfig, which AutoTokenizer would
        # otherwise read as a transformers model config (and warn about model_type "difflmm").
        tokenizer = AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig())
    except Exception as err:
        raise CheckpointError(
            f"{directory}: could not load the tokenizer ({type(err).__name__}: {err})"
        ) from err
    return model.eval(), tokenizer


def _local(path_or_ids) -> Path:
    """A directory, or the local Hugging Face cache snapshot of the first cached repo id."""
    candidates = (path_or_ids,) if isinstance(path_or_ids, (str, Path)) else tuple(path_or_ids)
    for candidate in candidates:
        if Path(candidate).is_dir():
            return Path(candidate)
        try:
            return Path(snapshot_download(str(candidate), local_files_only=True))
        except Exception:  # not cached (or not a repo id): try the next one
            continue
    raise CheckpointError(
        f"none of {list(map(str, candidates))} is a directory or a locally cached "
        "Hugging Face repo (download it first; the node works offline)"
    )


def released_difflmm_backend(
    device: str = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    *,
    adapter=RELEASED_ADAPTER,
    base=RELEASED_BASE,
    sd=RELEASED_SD,
    clip=RELEASED_CLIP,
    **options,
) -> Backend:
    """The released DiffLMM-7B behind the backend protocol. Each of adapter/base/sd/clip is a
    directory or a cached hub id (default: the usual ids); options: difflmm_backend's."""
    model, tokenizer = load_released_difflmm(
        _local(adapter),
        _local(base),
        _local(sd),
        _local(clip),
        dtype=dtype,
        device=device,
        seed=seed,
    )
    return difflmm_backend(model, tokenizer, **options)


def load_difflmm_backend(
    path, device: str = "cpu", dtype: torch.dtype = torch.float32, **options
) -> Backend:
    """A local-layout DiffLMM directory (save_difflmm) behind the backend protocol; options:
    difflmm_backend's (conversation, compile)."""
    return difflmm_backend(*load_difflmm(path, dtype=dtype, device=device), **options)
