"""Qwen2.5-VL backend on a tiny random Qwen2_5_VLForConditionalGeneration and its own processor
classes: recorder parity with the reference's eager read-out, the per-image non-square grid,
maps that land on the attended image token, and both modes end to end through the engine."""

import json

import pytest
import torch
import vlm_checks
from images import random_rgb

from groundlmm_ros.engine.refiners import SamRefiner, ThresholdRefiner
from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.models.qwen2_5_vl import Qwen2_5_VLLayout, qwen2_5_vl_backend
from groundlmm_ros.models.recorder import RECORDING_ATTENTION
from groundlmm_ros.models.tiny import TINY_QWEN_MAX_PIXELS, tiny_qwen2_5_vl, tiny_qwen_processor


@pytest.fixture(scope="module")
def backend():
    processor = tiny_qwen_processor()
    return qwen2_5_vl_backend(
        tiny_qwen2_5_vl(processor.tokenizer, seed=3), processor, max_pixels=TINY_QWEN_MAX_PIXELS
    )


def test_only_the_text_model_records(backend):
    assert backend.lm.config.text_config._attn_implementation == RECORDING_ATTENTION
    assert backend.lm.config.vision_config._attn_implementation != RECORDING_ATTENTION
    # Grouped-query attention and 3D rotary positions: what parity below has to get right.
    text = backend.lm.config.text_config
    assert (
        text.num_key_value_heads < text.num_attention_heads
        and text.rope_parameters["mrope_section"]
    )


(
    eager,
    test_batch_of_one_matches_eager_generate,
    test_left_padded_batch_matches_eager_generate,
    test_teacher_forcing_reads_the_rows_generation_reads,
) = vlm_checks.parity_tests("qwen2.5-vl", tiny_qwen2_5_vl)


@pytest.mark.parametrize(
    "height, width, grid", [(48, 80, (3, 5)), (80, 48, (5, 3)), (200, 100, (11, 5))]
)
def test_grid_is_the_images_own(backend, height, width, grid):
    """The map grid is image_grid_thw's height / 2 x width / 2: per image, not square, capped by
    max_pixels (200 x 100 = 20000 > 128 * 128 pixels: smart_resize scales it to 176 x 80)."""
    encoded = backend.encode(vlm_checks.image(5, height, width))
    assert encoded.inputs["image_grid_thw"][0].tolist() == [1, 2 * grid[0], 2 * grid[1]]
    assert backend.grid_of(encoded) == grid and len(encoded.features) == grid[0] * grid[1]
    _, maps = backend.generate(encoded, "Describe the image.", 2, stop_at_end=False)
    assert maps.shape == (2, grid[0] * grid[1])


@pytest.mark.parametrize("height, width, cell", [(48, 80, (1, 3)), (80, 48, (3, 0))])
def test_point_lands_on_the_attended_image_token(height, width, cell, monkeypatch):
    """All attention forced to the image token at grid cell (row, column): the point of every
    phrase lies in that cell's part of the image (the processor resized, so the grid spans the
    image)."""
    engine = build_engine("tiny-qwen2.5-vl-random", refiner="threshold", normalise=False)
    backend = engine.backend
    vlm_checks.force_attention_to_feature_zero(
        backend.lm.model.language_model, backend.lm.get_input_embeddings()
    )
    rows, columns = (height // 16, width // 16)
    index = cell[0] * columns + cell[1]
    monkeypatch.setattr(
        backend.prompts.layout,
        "image_features",
        lambda inputs: vlm_checks.one_hot_features(
            rows * columns, backend.lm.config.text_config.hidden_size, index
        ),
    )
    vlm_checks.check_point_in_cell(engine, height, width, (rows, columns), cell)


def test_describe_and_refer_end_to_end():
    engine = build_engine("tiny-qwen2.5-vl-random", seed=0)
    assert isinstance(engine.refiner, SamRefiner) and engine.upsample == "resize"
    vlm_checks.check_describe_and_refer(engine)


def test_model_directory_loads_like_the_preset(tmp_path):
    # the tiny model's cap (a real directory's loader keeps the reference's 1008 * 1008)
    def tiny_cap(backend):
        backend.prompts.layout.max_pixels = TINY_QWEN_MAX_PIXELS

    vlm_checks.check_directory_round_trip(
        build_engine("tiny-qwen2.5-vl-random", refiner="threshold"),
        tmp_path,
        Qwen2_5_VLLayout,
        tiny_cap,
    )


def test_llava_templates_are_refused():
    with pytest.raises(ValueError, match="own chat template"):
        build_engine("tiny-qwen2.5-vl-random", refiner="threshold", conversation="llava_v1")
    assert isinstance(
        build_engine("tiny-qwen2.5-vl-random", refiner="threshold").refiner, ThresholdRefiner
    )


def test_mixed_full_and_sliding_window_layers_match_eager():
    """Layer 0 full attention, layer 1 a sliding window of 16 keys (Qwen2's max_window_layers):
    the window's cache drops the early keys, image tokens among them, while tokens are generated."""
    processor = tiny_qwen_processor()
    sliding = dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    backend = qwen2_5_vl_backend(
        tiny_qwen2_5_vl(processor.tokenizer, seed=4, **sliding),
        processor,
        max_pixels=TINY_QWEN_MAX_PIXELS,
    )
    assert backend.lm.config.text_config.layer_types == ["full_attention", "sliding_attention"]
    eager = tiny_qwen2_5_vl(processor.tokenizer, seed=4, **sliding)
    eager.set_attn_implementation("eager")
    difference = vlm_checks.check_batch_of_one(backend, eager, vlm_checks.image(9, 40, 72))
    print(
        "qwen2.5-vl parity, sliding + full layers, batch of one: "
        f"max |recorder - eager| = {difference:.2e}"
    )
    # The window really cut keys off: the sliding layer's rows are 16 keys long while generating.
    out = vlm_checks.generate(
        eager,
        vlm_checks.processor_batch(
            backend, [vlm_checks.image(9, 40, 72)], vlm_checks.QUESTIONS[:1]
        ),
        output_attentions=True,
    )
    assert out.attentions[-1][1].shape[-1] == 16 < out.attentions[-1][0].shape[-1]
    encoded = backend.encode(vlm_checks.image(9, 40, 72))
    ids, generated = backend.generate(
        encoded, vlm_checks.QUESTIONS[0], vlm_checks.NEW_TOKENS, stop_at_end=False
    )
    torch.testing.assert_close(
        backend.teacher_force(encoded, vlm_checks.QUESTIONS[0], ids), generated, atol=1e-5, rtol=0
    )


def test_groundlmm_eval_takes_the_preset(capsys):
    from groundlmm_ros.cli import main

    main(["eval", "--model", "tiny-qwen2.5-vl-random", "--scenes", "2", "--threads", "1"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["model"] == "tiny-qwen2.5-vl-random" and metrics["scenes"] == 2


def test_a_question_holding_the_image_token_is_refused_clearly():
    engine = build_engine("tiny-qwen2.5-vl-random", refiner="threshold")
    with pytest.raises(InputError, match="contains the model's image token '<\\|image_pad\\|>'"):
        engine.ground(random_rgb(40, 56, 0), "What is <|image_pad|>?", "describe")
