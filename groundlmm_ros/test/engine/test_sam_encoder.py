"""SAM's image encoder: half precision (the default on CUDA) keeps the masks, and a frame is
embedded once however many queries use it. Tiny segment_anything Sams, CPU."""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.refiners import SamRefiner, mask_iou
from groundlmm_ros.models.tiny import tiny_sam

POINTS = [(5, 5), (35, 20), (60, 30), (10, 35)]


def frame(seed=0):
    return random_rgb(40, 70, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float16_encoder_masks_agree_with_float32(seed):
    full, half = SamRefiner(tiny_sam(seed)), SamRefiner(tiny_sam(seed), encoder_dtype=torch.float16)
    assert full.encoder_dtype == torch.float32  # the CPU default
    for refiner in (full, half):
        refiner.set_image(frame())
    assert half.predictor.features.dtype == torch.float32  # the decoder gets float32 either way
    differs = (half.predictor.features - full.predictor.features).abs().max()
    assert 0 < differs < 0.05  # it really ran in half precision, and stayed close
    no_map = np.zeros((40, 70), np.float32)
    for point in POINTS:
        a, _ = full.refine(no_map, point)
        b, _ = half.refine(no_map, point)
        assert a.any() and mask_iou(np.stack([a, b]))[0, 1] >= 0.98, point


def test_a_frame_is_embedded_once():
    refiner = SamRefiner(tiny_sam(0))
    calls = []
    refiner.predictor.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    image = frame(0)
    refiner.set_image(image)
    first, _ = refiner.refine(np.zeros((40, 70), np.float32), POINTS[0])
    refiner.set_image(image.copy())  # the same pixels in another array: cached
    assert len(calls) == 1
    again, _ = refiner.refine(np.zeros((40, 70), np.float32), POINTS[0])
    np.testing.assert_array_equal(first, again)
    image[0, 0] += 1  # the caller's array changed in place: a new frame
    refiner.set_image(image)
    refiner.set_image(frame(1))
    assert len(calls) == 3
