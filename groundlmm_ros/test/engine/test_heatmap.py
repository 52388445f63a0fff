"""Heat-map maths on maps with known answers."""

import numpy as np
import pytest
import torch

from groundlmm_ros.engine import heatmap
from groundlmm_ros.models.backend import pad_to_square

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
    assert heatmap.argmax_point(normalised[0].numpy()) == (4, 3)
    assert heatmap.argmax_point(normalised[1].numpy()) == (20, 10)


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
    assert heat.shape == (height, width) and heat.dtype == np.float32
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


def test_argmax_point_is_x_y():
    heat = np.zeros((10, 30), np.float32)
    heat[7, 21] = 1.0
    assert heatmap.argmax_point(heat) == (21, 7)
