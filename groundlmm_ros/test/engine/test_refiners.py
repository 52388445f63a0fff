"""Refiners: SAM (a tiny segment_anything Sam), the weight-free colour and threshold fallbacks;
filters."""

import pickle

import numpy as np
import pytest
import torch

from groundlmm_ros.engine.refiners import (
    ColourRefiner,
    SamRefiner,
    ThresholdRefiner,
    heat_region,
    load_sam,
    mask_iou,
    nms_keep,
)
from groundlmm_ros.evaluation import mask_iou as iou
from groundlmm_ros.models.tiny import tiny_sam
from groundlmm_ros.world import make_scenes

H, W = 40, 70


def blobs():
    """Heat map with a strong blob around (x=15, y=10) and a weaker one around (x=55, y=30)."""
    y, x = np.mgrid[0:H, 0:W]
    return (
        np.exp(-((x - 15) ** 2 + (y - 10) ** 2) / 20.0)
        + 0.8 * np.exp(-((x - 55) ** 2 + (y - 30) ** 2) / 20.0)
    ).astype(np.float32)


def refine_one(refiner, image, heat, point):
    """One phrase on one frame -> (mask, score)."""
    refiner.set_images([image])
    ((mask, score),) = refiner.refine(0, [heat], [point])
    return mask, score


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).randint(0, 256, (H, W, 3), dtype=np.uint8)


def test_sam_point_keeps_the_last_multimask_output(image):
    refiner = SamRefiner(tiny_sam(seed=1), "point")
    mask, score = refine_one(refiner, image, blobs(), (15, 10))
    masks, scores, _ = refiner.predictor.predict(
        point_coords=np.array([[15.0, 10.0]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, H, W)
    assert mask.shape == (H, W) and mask.dtype == bool
    np.testing.assert_array_equal(mask, masks[-1])
    assert score == pytest.approx(float(scores[-1]))


def test_sam_box_prompt_is_the_references_absolute_scale(image):
    """instance_seg.py --sam-mode mask: x = map / 2e-4; box where x > 0.75; mask prompt
    logit(clip(x, 1e-3, 1 - 1e-3)) resized bicubic to the mask frame's long side, zero-padded."""
    refiner = SamRefiner(tiny_sam(seed=1), "box")
    heat = np.zeros((H, W), np.float32)
    heat[5:12, 10:20] = 2e-4  # x = 1.0: inside the box
    heat[30:35, 50:60] = 1e-4  # x = 0.5: below 0.75, outside, however large relative to the rest
    scaled = heat / 2e-4
    np.testing.assert_array_equal(refiner.box_prompt(scaled), [10, 5, 20, 12])
    np.testing.assert_array_equal(
        refiner.box_prompt(scaled * 0.7), [0, 0, 0, 0]
    )  # nothing above 0.75
    side = refiner.predictor.model.prompt_encoder.mask_input_size[0]  # 16 for the tiny SAM
    # A constant map: every resized logit is logit(1 - 1e-3) = ln(999) in the top
    # int(40 / 70 * 16) = 9 rows (the long side W fills the frame), zeros below.
    constant = refiner.mask_prompt_logits(np.ones((H, W), np.float32))
    assert constant.shape == (1, side, side)
    np.testing.assert_allclose(constant[0, :9], np.log(999.0), rtol=1e-5)
    assert np.all(constant[0, 9:] == 0)
    # The reference's convert_mask_SAM, written out for one map.
    logits = np.log(np.clip(scaled, 1e-3, 1 - 1e-3) / (1 - np.clip(scaled, 1e-3, 1 - 1e-3)))
    rows = int(H / W * side)
    expected = torch.nn.functional.interpolate(
        torch.tensor(logits)[None, None], (rows, side), mode="bicubic", align_corners=False
    )
    expected = torch.nn.functional.pad(expected, (0, 0, 0, side - rows))[0].numpy()
    np.testing.assert_allclose(refiner.mask_prompt_logits(scaled), expected, atol=1e-5)
    mask, score = refine_one(refiner, image, heat, (15, 8))
    masks, scores, _ = refiner.predictor.predict(
        box=np.array([10, 5, 20, 12], np.float32), mask_input=expected, multimask_output=True
    )
    np.testing.assert_array_equal(mask, masks[-1])
    assert score == pytest.approx(float(scores[-1]), abs=1e-5)


def test_sam_rejects_an_unknown_prompt():
    with pytest.raises(ValueError, match="prompt"):
        SamRefiner(tiny_sam(), "scribble")


def test_threshold_takes_the_connected_region_of_the_point(image):
    refiner = ThresholdRefiner(fraction=0.5)
    heat = blobs()
    mask, score = refine_one(refiner, image, heat, (15, 10))
    assert score == 1.0 and mask.dtype == bool and mask.shape == (H, W)
    assert mask[10, 15] and not mask[30, 55]  # the other blob is above threshold but not connected
    assert np.all(heat[mask] >= heat.min() + 0.5 * (heat.max() - heat.min()))
    ((other, _),) = refiner.refine(0, [heat], [(55, 30)])
    assert other[30, 55] and not other[10, 15]
    with pytest.raises(ValueError):
        ThresholdRefiner(fraction=1.5)


def coarse_heatmap(obj, size):
    """What an 8 x 8 attention map upsampled to the image looks like: a wide blob on the object."""
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = obj.centre
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * (1.5 * obj.radius) ** 2)).astype(
        np.float32
    )


def scene_objects():
    """(image, object) pairs of synthetic scenes whose object centre lies on the object."""
    return [
        (s.image, o)
        for s in make_scenes(12, seed=11)
        for o in s.objects
        if o.mask[o.centre[1], o.centre[0]]
    ]


def test_colour_refiner_follows_the_object_where_the_map_is_coarse():
    colour, threshold = ColourRefiner(), ThresholdRefiner()
    colour_ious, threshold_ious = [], []
    for image, obj in scene_objects():
        heat = coarse_heatmap(obj, image.shape[0])
        for refiner, ious in ((colour, colour_ious), (threshold, threshold_ious)):
            mask, score = refine_one(refiner, image, heat, obj.centre)
            assert (
                mask.shape == obj.mask.shape
                and mask.dtype == bool
                and mask[obj.centre[1], obj.centre[0]]
            )
            assert score == 1.0
            ious.append(iou(mask, obj.mask))
    assert len(colour_ious) >= 20
    assert np.median(colour_ious) >= 0.9 and np.mean(colour_ious) > np.mean(threshold_ious) + 0.2


def test_colour_refiner_survives_sensor_noise():
    image, obj = scene_objects()[0]
    noisy = np.clip(image + np.random.RandomState(1).normal(0, 8, image.shape), 0, 255).astype(
        np.uint8
    )
    refiner = ColourRefiner()
    mask, _ = refine_one(refiner, noisy, coarse_heatmap(obj, image.shape[0]), obj.centre)
    assert iou(mask, obj.mask) >= 0.85


def test_colour_refiner_falls_back_to_the_map_without_a_colour_edge():
    flat = np.full((H, W, 3), 120, np.uint8)  # nothing to follow: the fill takes the whole region
    refiner, fallback = ColourRefiner(), ThresholdRefiner()
    mask, score = refine_one(refiner, flat, blobs(), (15, 10))
    np.testing.assert_array_equal(mask, refine_one(fallback, flat, blobs(), (15, 10))[0])
    assert score == 1.0 and not mask[30, 55]
    speck = flat.copy()
    speck[10, 15] = (250, 0, 0)  # the point on a one-pixel speck: too small a fill
    np.testing.assert_array_equal(refine_one(refiner, speck, blobs(), (15, 10))[0], mask)


def test_colour_refiner_stays_inside_the_region_of_the_map():
    image = np.full((H, W, 3), 120, np.uint8)
    image[:, :35] = (200, 30, 30)  # one red half, wider than the left blob's region
    refiner = ColourRefiner(margin=0.0, max_fill=1.0)
    mask, _ = refine_one(refiner, image, blobs(), (15, 10))
    region = heat_region(blobs(), (15, 10), refiner.fraction)
    assert mask.any() and not (mask & ~region).any() and not mask[:, 35:].any()


def test_colour_refiner_rejects_bad_use():
    with pytest.raises(ValueError, match="no frame 0"):
        ColourRefiner().refine(0, [blobs()], [(15, 10)])
    with pytest.raises(ValueError, match="size"):
        refine_one(ColourRefiner(), np.zeros((H + 1, W, 3), np.uint8), blobs(), (15, 10))
    for bad in ({"tolerance": 0}, {"fraction": 1.0}, {"min_fill": 0.5, "max_fill": 0.4}):
        with pytest.raises(ValueError):
            ColourRefiner(**bad)


def test_nms_keeps_the_best_of_overlapping_masks():
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5, :5] = True
    masks[1, :5, :4] = True  # IoU 0.8 with mask 0
    masks[2, 6:, 6:] = True
    iou = mask_iou(masks)
    assert iou[0, 1] == pytest.approx(0.8) and iou[0, 2] == 0.0
    assert nms_keep(masks, np.array([0.5, 0.9, 0.1]), 0.75) == [1, 2]
    assert nms_keep(masks, np.array([0.5, 0.9, 0.1]), 0.85) == [0, 1, 2]


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_sam_refuses_code_and_foreign_weights(tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Payload()}))
    # refused by the weights-only unpickler, and the error names the file
    with pytest.raises(ValueError, match="evil.pth: cannot be read") as refused:
        load_sam(str(evil))
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    foreign = tmp_path / "foreign.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(32, 3, 16, 16)}, foreign)
    with pytest.raises(ValueError, match="not a SAM"):
        load_sam(str(foreign))
