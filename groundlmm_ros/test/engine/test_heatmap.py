"""Heat-map maths on maps with known answers, and on a tiny model's device against the CPU."""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine import heatmap
from groundlmm_ros.models.llava_prompts import pad_to_square
from groundlmm_ros.models.presets import build_engine

GRID = 24


def peak_map(row, column, grid=GRID):
    maps = torch.zeros(1, grid, grid)
    maps[0, row, column] = 1.0
    return maps


def test_normalise_removes_the_shared_sink():
    sink = torch.zeros(GRID, GRID)
    sink[0, 0] = 5.0  # every token attends to the same corner
    maps = torch.stack([sink + peak_map(3, 4)[0], sink + peak_map(10, 20)[0], sink])
    normalised = heatmap.normalise(maps)
    assert torch.allclose(normalised.mean(dim=0), torch.zeros(GRID, GRID), atol=1e-6)
    assert normalised[0, 0, 0] == 0.0  # the sink is gone
    assert heatmap.argmax_point(normalised[0]) == (4, 3)
    assert heatmap.argmax_point(normalised[1]) == (20, 10)


def test_combine_max_mean_first():
    maps = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]], [[2.0, 1.0]]])  # (3 tokens, 1, 2)
    assert heatmap.combine(maps, [0, 1], "max").tolist() == [[1.0, 3.0]]
    torch.testing.assert_close(
        heatmap.combine(maps, [0, 1, 2], "mean"), torch.tensor([[1.0, 4.0 / 3.0]])
    )
    assert heatmap.combine(maps, [2, 0], "first").tolist() == [[2.0, 1.0]]
    with pytest.raises(ValueError, match="combine"):
        heatmap.combine(maps, [0], "median")
    with pytest.raises(ValueError, match="at least one token"):
        heatmap.combine(maps, [], "max")


@pytest.mark.parametrize("height, width", [(480, 240), (240, 480), (300, 300), (101, 37)])
def test_pad_undo_puts_the_peak_where_the_object_is(height, width):
    """Paint a square object in the image, pad it to a square as the model sees it, put the
    grid peak on the cell that holds the object's centre in the padded square: the
    upsampled, centre-cropped map must peak on the object in the ORIGINAL image."""
    image = np.zeros((height, width, 3), np.uint8)
    object_y, object_x = int(height * 0.7), int(width * 0.25)
    image[object_y, object_x] = 255
    square = pad_to_square(image, (0, 0, 0))
    side = square.shape[0]
    row_in_square, column_in_square = np.argwhere(square[..., 0] == 255)[0]
    cell = (int(row_in_square * GRID / side), int(column_in_square * GRID / side))
    heat = heatmap.upsample(peak_map(*cell), (height, width), "pad")[0]
    assert heat.shape == (height, width) and heat.dtype == torch.float32
    x, y = heatmap.argmax_point(heat)
    cell_pixels = side / GRID
    assert abs(x - object_x) <= cell_pixels and abs(y - object_y) <= cell_pixels
    # A plain resize of the same map lands elsewhere on non-square images.
    if height != width:
        x_resized, y_resized = heatmap.argmax_point(
            heatmap.upsample(peak_map(*cell), (height, width), "resize")[0]
        )
        assert abs(x_resized - object_x) > cell_pixels or abs(y_resized - object_y) > cell_pixels


def test_pad_upsample_is_bicubic_upsample_then_centre_crop():
    maps = torch.rand(2, GRID, GRID, generator=torch.Generator().manual_seed(0))
    heat = heatmap.upsample(maps, (50, 120), "pad")
    full = torch.nn.functional.interpolate(
        maps[None], size=(120, 120), mode="bicubic", align_corners=False
    )[0]
    np.testing.assert_allclose(heat, full[:, 35:85, :].numpy(), atol=1e-6)
    resized = heatmap.upsample(maps, (50, 120), "resize")
    expected = torch.nn.functional.interpolate(
        maps[None], size=(50, 120), mode="bicubic", align_corners=False
    )[0]
    np.testing.assert_allclose(resized, expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="upsample mode"):
        heatmap.upsample(maps, (5, 5), "stretch")


def test_argmax_point_is_x_y_and_the_first_maximum():
    heat = torch.zeros(10, 30)
    heat[7, 21] = 1.0
    assert heatmap.argmax_point(heat) == (21, 7)
    heat[9, 2] = heat[7, 25] = 1.0  # ties: the first in row-major order, as numpy's argmax
    assert heatmap.argmax_point(heat) == (21, 7)


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    "preset, size", [("tiny-random", (48, 80)), ("tiny-qwen2.5-vl-random", (64, 40))]
)
def test_heat_maps_on_the_device_give_the_cpu_points(preset, size, device):
    """The engine's heat maps, made on the model's device, against the maps of the same answer
    brought to the CPU and taken through mean subtraction, max, bicubic upsampling (pad or
    resize) and numpy's argmax: the same points, maps within float rounding."""
    engine = build_engine(preset, device=device, refiner="threshold", seed=0)
    image = random_rgb(*size, seed=0)
    question = "Describe the image in detail."
    answer = engine.answer(image, question)
    assert answer.maps.device.type == device
    grounding = engine.ground(image, question)
    assert grounding.token_ids == answer.token_ids and grounding.phrases
    grid = answer.maps.float().cpu().reshape(-1, *answer.grid)
    grid = grid - grid.mean(dim=0)
    height, width = size
    side = max(size) if engine.upsample == "pad" else None
    for phrase in grounding.phrases:
        combined = grid[phrase.token_indices].amax(dim=0)[None, None]
        if side is None:
            expected = torch.nn.functional.interpolate(combined, size, mode="bicubic")[0, 0]
        else:
            square = torch.nn.functional.interpolate(combined, (side, side), mode="bicubic")[0, 0]
            top, left = (side - height) // 2, (side - width) // 2
            expected = square[top : top + height, left : left + width]
        expected = expected.numpy()
        np.testing.assert_allclose(phrase.heatmap, expected, rtol=0, atol=1e-5)
        row, column = np.unravel_index(int(np.argmax(expected)), expected.shape)
        assert phrase.point == (column, row)
