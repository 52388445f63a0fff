"""DiffLMM checkpoints: a tiny model written in the RELEASED layout (same file names,
same tensor names, a real peft LoRA adapter) loads through the real loader and
matches the in-memory model it was written from; broken files are refused with
messages that name the file and the tensor. Also the local save/load format."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from images import random_rgb
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from groundlmm_ros.models.difflmm import DiffLMM, build_difflmm, difflmm_backend
from groundlmm_ros.models.difflmm_checkpoint import (
    NON_LORA_FILE,
    CheckpointError,
    load_difflmm,
    load_released_difflmm,
    released_difflmm_backend,
    save_difflmm,
)
from groundlmm_ros.models.tiny import tiny_difflmm_config, tiny_tokenizer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "Describe the image in detail."


def write_released(root, *, patch_token_key: bool = True):
    """Writes adapter/, base/, sd/, clip/ as the released DiffLMM is laid out; returns the
    in-memory model (LoRA merged) and its tokenizer."""
    tokenizer = tiny_tokenizer()
    config = tiny_difflmm_config(len(tokenizer))
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config.vae)
    unet = UNet2DConditionModel.from_config(config.unet)
    # openai/clip-vit-large-patch14-336 is a full CLIP (text tower too); the model uses its vision
    # part.
    full_clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=config.clip,
            projection_dim=16,
        )
    )
    clip = CLIPVisionModel(CLIPVisionConfig(**config.clip))
    clip.load_state_dict(full_clip.vision_model.state_dict())
    base = LlamaForCausalLM(LlamaConfig(**config.llama))
    vae.save_pretrained(root / "sd" / "vae")
    unet.save_pretrained(root / "sd" / "unet")
    DDIMScheduler.from_config(config.scheduler).save_pretrained(root / "sd" / "scheduler")
    full_clip.save_pretrained(root / "clip")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.05,
            bias="none",
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    with torch.no_grad():  # peft starts lora_B at zero, a no-op adapter: make it count
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    lora.save_pretrained(root / "adapter")
    model = DiffLMM(config, vae=vae, unet=unet, clip=clip, language_model=lora.merge_and_unload())
    torch.save(
        {
            f"base_model.model.model.mm_projector.{k}": v
            for k, v in model.mm_projector.state_dict().items()
        },
        root / "adapter" / NON_LORA_FILE,
    )
    llava_fields = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": config.llama["hidden_size"],
        "vocab_size": config.llama["vocab_size"],
        "mm_projector_type": "SDCLIPBlock",
        "mm_vision_tower": "runwayml/stable-diffusion-v1-5",
        "mm_vision_select_layer": 1,
        "mm_vision_sd_timestep": 100,
        "mm_vision_sd_ensemble_size": 1,
        "mm_vision_sd_clip": "openai/clip-vit-large-patch14-336",
        "mm_vision_sd_clip_proj_in": config.clip["hidden_size"],
        "mm_vision_sd_clip_proj_out": config.unet["cross_attention_dim"],
        "mm_vision_sd_concat_clip": True,
        "mm_vision_sd_implicit_caption": True,
        "mm_vision_sd_pe": config.num_image_tokens,
        "mm_vision_resolution": config.image_size,
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_hidden_size": [32, config.sd_channels, 16, 8, config.clip["hidden_size"]],
    }
    if patch_token_key:
        llava_fields["mm_use_im_patch_token"] = False
    (root / "adapter" / "config.json").write_text(json.dumps(llava_fields))
    return model, tokenizer


def released_dirs(root):
    return dict(
        adapter_dir=root / "adapter",
        base_dir=root / "base",
        sd_dir=root / "sd",
        clip_dir=root / "clip",
    )


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    model, tokenizer = write_released(root)
    return root, model, tokenizer


@pytest.fixture
def broken(released, tmp_path):
    """A private copy of the released layout to damage."""
    shutil.copytree(released[0], tmp_path / "copy")
    return tmp_path / "copy"


def image(seed=0):
    return random_rgb(40, 28, seed)


def answer_and_maps(backend):
    tokens = backend.encode(image())
    ids, maps = backend.generate(tokens, QUESTION, max_new_tokens=8)
    return tokens, ids, maps


def test_released_layout_loads_and_matches_the_model_it_was_written_from(released):
    root, model, tokenizer = released
    loaded, loaded_tokenizer = load_released_difflmm(**released_dirs(root), dtype=torch.float32)
    assert loaded.language_model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # The captioner exists once, inside mm_projector, with the file's values.
    for name, tensor in model.mm_projector.state_dict().items():
        assert torch.equal(loaded.mm_projector.state_dict()[name], tensor), name
    expected = answer_and_maps(difflmm_backend(model, tokenizer))
    got = answer_and_maps(difflmm_backend(loaded, loaded_tokenizer))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    assert got[1] == expected[1]
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=1e-6)


def backend_from_directories(root):
    """The released layout's four directories under root, loaded as a backend."""
    return released_difflmm_backend(
        "cpu",
        torch.float32,
        adapter=root / "adapter",
        base=root / "base",
        sd=root / "sd",
        clip=root / "clip",
    )


def test_released_backend_from_directories_and_uncached_ids(released):
    backend = backend_from_directories(released[0])
    assert isinstance(backend.prompts.encoder, DiffLMM) and backend.prompts.grid == (8, 8)
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model.* locally cached"):
        released_difflmm_backend("cpu", torch.float32, adapter="no-such-org/no-such-model")


def test_released_preprocessing_is_clip_processor_on_the_clip_mean_square(released):
    """The released weights saw LLaVA's process_images with CLIPImageProcessor(size=S, crop_size=S)
    and OpenAI CLIP's mean/std (the reference's mean=std=0.5 keywords are not the class's, so
    they change nothing): pad to square with int(255 * mean) = (122, 116, 104), then the
    processor."""
    backend = backend_from_directories(released[0])
    size = backend.prompts.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)
    assert backend.prompts.preprocessing.pad_color == (122, 116, 104)
    for height, width in ((40, 28), (21, 64)):
        picture = random_rgb(height, width, height)
        side = max(height, width)
        square = Image.new("RGB", (side, side), (122, 116, 104))  # LLaVA's expand2square
        square.paste(Image.fromarray(picture), ((side - width) // 2, (side - height) // 2))
        expected = processor(images=square, return_tensors="pt")["pixel_values"]
        got = backend.prompts.preprocess(picture)
        assert got.shape == expected.shape == (1, 3, size, size)
        assert (got - expected).abs().max() <= 0.02
        assert expected.min() < -1.05 or expected.max() > 1.05  # CLIP-normalised, not [-1, 1]


def test_lora_adapter_is_merged(released):
    """The adapter changes the LLM: loading without it would give other weights."""
    root, model, _ = released
    base = LlamaForCausalLM.from_pretrained(root / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base.state_dict()[name], model.language_model.state_dict()[name])


def test_adapter_as_pickled_bin_loads_too(broken, released):
    """Older peft (the release's era) wrote adapter_model.bin."""
    weights = load_file(broken / "adapter" / "adapter_model.safetensors")
    torch.save(weights, broken / "adapter" / "adapter_model.bin")
    os.remove(broken / "adapter" / "adapter_model.safetensors")
    loaded, _ = load_released_difflmm(**released_dirs(broken), dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(
        loaded.language_model.state_dict()[name], released[1].language_model.state_dict()[name]
    )


def test_missing_patch_token_key_grows_vocabulary_by_one(tmp_path):
    model, tokenizer = write_released(tmp_path, patch_token_key=False)
    loaded, loaded_tokenizer = load_released_difflmm(**released_dirs(tmp_path), dtype=torch.float32)
    assert len(loaded_tokenizer) == len(tokenizer) + 1
    assert loaded_tokenizer.convert_ids_to_tokens(len(tokenizer)) == "<im_patch>"
    for weight in (
        loaded.language_model.get_input_embeddings().weight,
        loaded.language_model.get_output_embeddings().weight,
    ):
        assert weight.shape[0] == len(tokenizer) + 1
        torch.testing.assert_close(weight[-1], weight[:-1].mean(0))
    torch.testing.assert_close(
        loaded.encode_image(torch.zeros(1, 3, 32, 32)),
        model.encode_image(torch.zeros(1, 3, 32, 32)),
        rtol=0,
        atol=1e-6,
    )


def test_bf16_on_request(released):
    loaded, _ = load_released_difflmm(**released_dirs(released[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.encode_image(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16


def save_non_lora(path, edit):
    tensors = torch.load(path, weights_only=True)
    edit(tensors)
    torch.save(tensors, path)


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(d / "adapter" / NON_LORA_FILE), f"missing file: .*{NON_LORA_FILE}"),
        (
            lambda d: os.remove(d / "sd" / "unet" / "config.json"),
            "missing file: .*unet/config.json",
        ),
        (
            lambda d: os.remove(d / "adapter" / "adapter_model.safetensors"),
            "missing file: .*adapter_model",
        ),
        (
            lambda d: save_non_lora(
                d / "adapter" / NON_LORA_FILE,
                lambda t: t.pop("base_model.model.model.mm_projector.vt_pe"),
            ),
            f"{NON_LORA_FILE}: missing tensor.*vt_pe",
        ),
        (
            lambda d: save_non_lora(
                d / "adapter" / NON_LORA_FILE,
                lambda t: t.update(
                    {"base_model.model.model.mm_projector.linear.0.weight": torch.zeros(32, 7)}
                ),
            ),
            r"tensor linear.0.weight has shape \(32, 7\), the model needs \(32, 32\)",
        ),
        (
            lambda d: save_non_lora(
                d / "adapter" / NON_LORA_FILE,
                lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(2)}),
            ),
            "outside model.mm_projector",
        ),
        (
            lambda d: (d / "adapter" / NON_LORA_FILE).write_bytes(
                np.random.default_rng(0).bytes(4096)
            ),
            f"{NON_LORA_FILE}: corrupt, truncated or unsafe",
        ),
        (
            lambda d: (d / "adapter" / NON_LORA_FILE).write_bytes(
                (d / "adapter" / NON_LORA_FILE).read_bytes()[:3000]
            ),
            f"{NON_LORA_FILE}: corrupt, truncated or unsafe",
        ),
        (
            lambda d: (d / "adapter" / "adapter_model.safetensors").write_bytes(
                (d / "adapter" / "adapter_model.safetensors").read_bytes()[:2000]
            ),
            "adapter_model.safetensors: corrupt, truncated or unsafe",
        ),
        (
            lambda d: save_file(
                {
                    k: v
                    for k, v in load_file(d / "adapter" / "adapter_model.safetensors").items()
                    if "layers.1.mlp.up_proj.lora_A" not in k
                },
                d / "adapter" / "adapter_model.safetensors",
            ),
            r"adapter_model.safetensors: missing tensor.*layers.1.mlp.up_proj.lora_A.weight",
        ),
        (
            lambda d: save_file(
                {
                    k: v
                    for k, v in load_file(d / "base" / "model.safetensors").items()
                    if k != "model.layers.1.mlp.up_proj.weight"
                },
                d / "base" / "model.safetensors",
                metadata={"format": "pt"},
            ),
            r"base: missing tensor.*model.layers.1.mlp.up_proj.weight",
        ),
        (
            lambda d: (d / "sd" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
                (d / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:3000]
            ),
            "sd/unet: could not load",
        ),
        (
            lambda d: os.remove(d / "clip" / "model.safetensors"),
            "clip: could not load .*no file named model.safetensors",
        ),
        (
            lambda d: (d / "adapter" / "config.json").write_text(
                (d / "adapter" / "config.json").read_text().replace('"SDCLIPBlock"', '"mlp2x_gelu"')
            ),
            "mm_projector_type is 'mlp2x_gelu'",
        ),
        (
            lambda d: (d / "adapter" / "config.json").write_text(
                (d / "adapter" / "config.json")
                .read_text()
                .replace('"mm_vision_sd_pe": 64', '"mm_vision_sd_pe": 576')
            ),
            "mm_vision_sd_pe is 576 but the component configs give 64",
        ),
    ],
    ids=[
        "no-non-lora",
        "no-unet-config",
        "no-adapter",
        "non-lora-missing-tensor",
        "non-lora-shape",
        "non-lora-stray-tensor",
        "non-lora-corrupt",
        "non-lora-truncated",
        "adapter-truncated",
        "adapter-missing-tensor",
        "base-missing-tensor",
        "unet-truncated",
        "clip-no-weights",
        "wrong-projector-type",
        "wrong-pe",
    ],
)
def test_broken_released_checkpoints_are_refused(broken, damage, message):
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        load_released_difflmm(**released_dirs(broken), dtype=torch.float32)


def test_pickle_with_code_is_refused_without_running_it(broken, tmp_path):
    marker = tmp_path / "ran"
    torch.save(
        {"base_model.model.model.mm_projector.vt_pe": Payload(marker)},
        broken / "adapter" / NON_LORA_FILE,
    )
    with pytest.raises(
        CheckpointError, match=f"{NON_LORA_FILE}: .*unsafe.*the pickle calls posix.system"
    ):
        load_released_difflmm(**released_dirs(broken), dtype=torch.float32)
    assert not marker.exists()


def test_local_format_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    model = build_difflmm(tiny_difflmm_config(len(tokenizer), seed=5))
    save_difflmm(model, tokenizer, tmp_path / "demo")
    loaded, loaded_tokenizer = load_difflmm(tmp_path / "demo")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    expected = answer_and_maps(difflmm_backend(model, tokenizer))
    got = answer_and_maps(difflmm_backend(loaded, loaded_tokenizer))
    assert (
        torch.equal(got[0], expected[0])
        and got[1] == expected[1]
        and torch.equal(got[2], expected[2])
    )


def test_local_format_refuses_damage(tmp_path):
    tokenizer = tiny_tokenizer()
    save_difflmm(build_difflmm(tiny_difflmm_config(len(tokenizer))), tokenizer, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit"):
        load_difflmm(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["llama"]["hidden_size"] = 48
    save_difflmm(build_difflmm(tiny_difflmm_config(len(tokenizer))), tokenizer, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit"):
        load_difflmm(tmp_path / "m")
