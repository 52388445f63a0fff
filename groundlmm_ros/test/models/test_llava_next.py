"""LLaVA-NeXT backend on a tiny random LlavaNextForConditionalGeneration and its own processor
classes: recorder parity with the reference's eager read-out, the any-resolution layout (base
tile, unpadded high-resolution grid, newline tokens off the map) and both modes end to end."""

import pytest
import vlm_checks
from transformers.image_processing_utils import select_best_resolution

from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.refiners import SamRefiner, ThresholdRefiner
from groundlmm_ros.models.llava_next import LlavaNextLayout, llava_next_backend
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.models.tiny import (
    TINY_NEXT_PATCH,
    TINY_NEXT_PINPOINTS,
    tiny_llava_next,
    tiny_llava_next_processor,
)

BASE_SIDE = 4  # 32-pixel tiles of 8-pixel patches


@pytest.fixture(scope="module")
def backend():
    processor = tiny_llava_next_processor()
    return llava_next_backend(tiny_llava_next(processor.tokenizer, seed=3), processor)


def reference_unpadded_grid(height, width):
    """The reference's get_unpad_feature_size (aas/more_models/llava_next.py), on the best
    any-resolution canvas in patches: -> (rows, columns) of the high-resolution map."""
    best_height, best_width = select_best_resolution((height, width), TINY_NEXT_PINPOINTS)
    feature_width, feature_height = best_width // TINY_NEXT_PATCH, best_height // TINY_NEXT_PATCH
    if width / height > feature_width / feature_height:
        new_height = int(height * feature_width / width)
        return feature_height - 2 * ((feature_height - new_height) // 2), feature_width
    new_width = int(width * feature_height / height)
    return feature_height, feature_width - 2 * ((feature_width - new_width) // 2)


(
    eager,
    test_batch_of_one_matches_eager_generate,
    test_left_padded_batch_matches_eager_generate,
    test_teacher_forcing_reads_the_rows_generation_reads,
) = vlm_checks.parity_tests("llava-next", tiny_llava_next)


@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (40, 40), (30, 100), (100, 45)])
def test_layout_is_the_references(backend, height, width):
    """base tile (4 x 4) + unpadded rows x (columns + newline); the map is the unpadded grid."""
    rows, columns = reference_unpadded_grid(height, width)
    encoded = backend.encode(vlm_checks.image(5, height, width))
    assert backend.grid_of(encoded) == (rows, columns)
    assert len(encoded.features) == BASE_SIDE**2 + rows * (columns + 1)
    expected = [BASE_SIDE**2 + r * (columns + 1) + c for r in range(rows) for c in range(columns)]
    assert encoded.grid_columns.tolist() == expected


@pytest.fixture(scope="module")
def forced():
    """A tiny LLaVA-NeXT (with q/k biases, so queries can be made constant) whose attention goes
    to the image token with a large feature dimension 0."""
    return vlm_checks.forced_model(tiny_llava_next_processor, tiny_llava_next, attention_bias=True)


@pytest.mark.parametrize("use_base_patches", [False, True])
@pytest.mark.parametrize("height, width, cell", [(48, 80, (2, 6)), (80, 48, (6, 1))])
def test_point_lands_on_the_attended_image_token(
    forced, monkeypatch, use_base_patches, height, width, cell
):
    processor, model = forced
    backend = llava_next_backend(model, processor, use_base_patches=use_base_patches)
    rows, columns = (
        (BASE_SIDE, BASE_SIDE) if use_base_patches else reference_unpadded_grid(height, width)
    )
    cell = (cell[0] * rows // 8, cell[1] * columns // 8)  # the same place on a coarser grid
    index = (
        cell[0] * columns + cell[1]
        if use_base_patches
        else BASE_SIDE**2 + cell[0] * (columns + 1) + cell[1]
    )
    n_image = BASE_SIDE**2 + (lambda r, c: r * (c + 1))(*reference_unpadded_grid(height, width))
    monkeypatch.setattr(
        backend.prompts.layout,
        "image_features",
        lambda inputs: vlm_checks.one_hot_features(
            n_image, model.config.text_config.hidden_size, index
        ),
    )
    engine = Engine(backend, ThresholdRefiner(), normalise=False, max_new_tokens=8)
    vlm_checks.check_point_in_cell(engine, height, width, (rows, columns), cell)


def test_newline_tokens_are_off_the_map(forced, monkeypatch):
    """All attention on a row's newline token: nothing of it reaches the map."""
    processor, model = forced
    backend = llava_next_backend(model, processor)
    rows, columns = reference_unpadded_grid(48, 80)
    newline = BASE_SIDE**2 + columns  # the first row's newline
    monkeypatch.setattr(
        backend.prompts.layout,
        "image_features",
        lambda inputs: vlm_checks.one_hot_features(
            BASE_SIDE**2 + rows * (columns + 1), model.config.text_config.hidden_size, newline
        ),
    )
    _, maps = backend.generate(
        backend.encode(vlm_checks.image(7, 48, 80)), "Describe the image.", 3
    )
    assert maps.shape[1] == rows * columns and maps.sum(dim=1).max() < 1e-3


def test_describe_and_refer_end_to_end():
    engine = build_engine("tiny-llava-next-random", seed=0)
    assert isinstance(engine.refiner, SamRefiner) and engine.upsample == "resize"
    vlm_checks.check_describe_and_refer(engine)


def test_model_directory_loads_like_the_preset(tmp_path):
    vlm_checks.check_directory_round_trip(
        build_engine("tiny-llava-next-random", refiner="threshold"), tmp_path, LlavaNextLayout
    )
