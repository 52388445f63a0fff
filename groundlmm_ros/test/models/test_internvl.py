"""InternVL backend on a tiny random InternVLForConditionalGeneration and its own processor classes:
recorder parity with the reference's eager read-out, the tiling layout (tiles stitched into one
grid, the thumbnail off it or alone) and both modes end to end."""

import pytest
import torch
import vlm_checks

from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.refiners import SamRefiner, ThresholdRefiner
from groundlmm_ros.models.internvl import InternVLLayout, internvl_backend
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.models.tiny import (
    TINY_INTERNVL_TILE,
    TINY_INTERNVL_TILES,
    tiny_internvl,
    tiny_internvl_processor,
)

SIDE = 4  # tokens per tile side: 32-pixel tiles, 4-pixel patches, 0.5 pixel shuffle


@pytest.fixture(scope="module")
def backend():
    processor = tiny_internvl_processor()
    return internvl_backend(
        tiny_internvl(processor.tokenizer, seed=3), processor, tiles=TINY_INTERNVL_TILES
    )


def reference_tiles(height, width, min_num, max_num):
    """The reference's dynamic_preprocess tile choice (aas/more_models/internvl2_5_image_loader.py:
    find_closest_aspect_ratio) -> (columns, rows)."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    best, best_diff = (1, 1), float("inf")
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif (
            diff == best_diff
            and width * height > 0.5 * TINY_INTERNVL_TILE * TINY_INTERNVL_TILE * ratio[0] * ratio[1]
        ):
            best = ratio
    return best


def reference_map_order(columns, rows):
    """The reference's read-out of the tiles' tokens (aas/more_models/internvl2_5.py): thumbnail
    dropped, reshape (rows, columns, side, side), permute (0, 2, 1, 3) -> which token each map
    cell is."""
    tokens = torch.arange(rows * columns * SIDE * SIDE)
    return (
        tokens.reshape(rows, columns, SIDE, SIDE)
        .permute(0, 2, 1, 3)
        .reshape(rows * SIDE, columns * SIDE)
    )


(
    eager,
    test_batch_of_one_matches_eager_generate,
    test_left_padded_batch_matches_eager_generate,
    test_teacher_forcing_reads_the_rows_generation_reads,
) = vlm_checks.parity_tests("internvl", tiny_internvl)


@pytest.mark.parametrize("tiles", [TINY_INTERNVL_TILES, (3, 9)])
@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (40, 40), (30, 100), (100, 45)])
def test_layout_is_the_references(backend, height, width, tiles):
    columns, rows = reference_tiles(height, width, *tiles)
    tiled = internvl_backend(backend.lm, backend.prompts.processor, tiles=tiles)
    encoded = tiled.encode(vlm_checks.image(5, height, width))
    thumbnail = rows * columns > 1
    assert encoded.inputs["pixel_values"].shape[0] == rows * columns + thumbnail
    assert len(encoded.features) == (rows * columns + thumbnail) * SIDE * SIDE
    assert tiled.grid_of(encoded) == (rows * SIDE, columns * SIDE)
    assert encoded.grid_columns.tolist() == reference_map_order(columns, rows).flatten().tolist()
    if thumbnail:
        alone = internvl_backend(
            backend.lm, backend.prompts.processor, tiles=tiles, use_thumbnail=True
        )
        encoded = alone.encode(vlm_checks.image(5, height, width))
        assert alone.grid_of(encoded) == (SIDE, SIDE)
        assert encoded.grid_columns.tolist() == list(
            range(rows * columns * SIDE**2, len(encoded.features))
        )


@pytest.fixture(scope="module")
def forced():
    """A tiny InternVL whose attention goes to the image token with a large feature dimension 0."""
    return vlm_checks.forced_model(tiny_internvl_processor, tiny_internvl)


@pytest.mark.parametrize("use_thumbnail", [False, True])
@pytest.mark.parametrize("height, width, cell", [(48, 80, (5, 9)), (80, 48, (10, 2))])
def test_point_lands_on_the_attended_image_token(
    forced, monkeypatch, use_thumbnail, height, width, cell
):
    processor, model = forced
    backend = internvl_backend(
        model, processor, tiles=TINY_INTERNVL_TILES, use_thumbnail=use_thumbnail
    )
    columns, rows = reference_tiles(height, width, *TINY_INTERNVL_TILES)
    n_tiled = rows * columns * SIDE * SIDE
    if use_thumbnail:
        grid = (SIDE, SIDE)
        # the same place, coarser
        cell = (cell[0] * SIDE // (rows * SIDE), cell[1] * SIDE // (columns * SIDE))
        index = n_tiled + cell[0] * SIDE + cell[1]
    else:
        grid = (rows * SIDE, columns * SIDE)
        index = int(reference_map_order(columns, rows)[cell])
    monkeypatch.setattr(
        backend.prompts.layout,
        "image_features",
        lambda inputs: vlm_checks.one_hot_features(
            n_tiled + SIDE * SIDE, model.config.text_config.hidden_size, index
        ),
    )
    engine = Engine(backend, ThresholdRefiner(), normalise=False, max_new_tokens=8)
    vlm_checks.check_point_in_cell(engine, height, width, grid, cell)


def test_describe_and_refer_end_to_end():
    engine = build_engine("tiny-internvl-random", seed=0)
    assert isinstance(engine.refiner, SamRefiner) and engine.upsample == "resize"
    vlm_checks.check_describe_and_refer(engine)


def test_model_directory_loads_like_the_preset(tmp_path):
    # the tiny model's tiling (a real directory's loader keeps the reference's 3 to 9)
    def tiny_tiles(backend):
        backend.prompts.layout.tiles = TINY_INTERNVL_TILES

    vlm_checks.check_directory_round_trip(
        build_engine("tiny-internvl-random", refiner="threshold"),
        tmp_path,
        InternVLLayout,
        tiny_tiles,
    )
