"""SAM fast: the image encoder under bfloat16 autocast (the default on CUDA) keeps the masks,
several frames embedded in one call and several phrases decoded in one prompt call give what
each gives alone, a frame is embedded once however many queries use it, and a compiled encoder
gives the eager one's masks. Tiny segment_anything Sams, CPU."""

import shutil

import numpy as np
import pytest
import torch
from images import random_rgb
from torch._dynamo.utils import counters

from groundlmm_ros.engine.refiners import SamRefiner, mask_iou
from groundlmm_ros.models.tiny import tiny_sam

POINTS = [(5, 5), (35, 20), (60, 30), (10, 35)]


def frame(seed=0, height=40, width=70):
    return random_rgb(height, width, seed)


def blob(centre, height=40, width=70):
    y, x = np.mgrid[0:height, 0:width]
    heat = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / 30.0)
    return (2e-4 * heat).astype(np.float32)


def features(refiner, image=0):
    return refiner._embeddings[image].features


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_encoder_masks_agree_with_float32(seed):
    full = SamRefiner(tiny_sam(seed))
    half = SamRefiner(tiny_sam(seed), encoder_dtype=torch.bfloat16)
    assert full.encoder_dtype == torch.float32  # the CPU default
    for refiner in (full, half):
        refiner.set_images([frame()])
    # The prompt decoder gets float32 either way.
    assert features(half).dtype == torch.float32
    differs = (features(half) - features(full)).abs().max()
    assert 0 < differs < 0.05  # it really ran in bfloat16, and stayed close
    no_maps = [np.zeros((40, 70), np.float32)] * len(POINTS)
    for point, (a, _), (b, _) in zip(
        POINTS, full.refine(0, no_maps, POINTS), half.refine(0, no_maps, POINTS)
    ):
        assert a.any() and mask_iou(np.stack([a, b]))[0, 1] >= 0.98, point


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_point_prompts_give_the_masks_of_one_at_a_time(seed):
    """One predict_torch call for every phrase = SamPredictor.predict per point, with the
    reference's multimask output and its last mask."""
    refiner = SamRefiner(tiny_sam(seed), "point")
    refiner.set_images([frame(seed)])
    batched = refiner.refine(0, [None] * len(POINTS), POINTS)
    for point, (mask, score) in zip(POINTS, batched):
        masks, scores, _ = refiner.predictor.predict(
            point_coords=np.array([point], np.float32),
            point_labels=np.array([1]),
            multimask_output=True,
        )
        np.testing.assert_array_equal(mask, masks[-1])
        assert score == pytest.approx(float(scores[-1]), abs=1e-6)


def test_batched_box_prompts_give_the_masks_of_one_at_a_time():
    """The reference's box + mask prompt ("box"), one phrase per heat map, all in one call; one
    map with nothing above the threshold (an all-zero box)."""
    refiner = SamRefiner(tiny_sam(1), "box")
    refiner.set_images([frame(1)])
    heatmaps = [blob((15, 10)), blob((55, 30)), blob((35, 20)) * 0.5, 3 * blob((10, 35))]
    batched = refiner.refine(0, heatmaps, [(0, 0)] * len(heatmaps))
    assert not refiner.box_prompt(heatmaps[2] / refiner.attention_temperature).any()
    for heat, (mask, score) in zip(heatmaps, batched):
        scaled = heat / refiner.attention_temperature
        masks, scores, _ = refiner.predictor.predict(
            box=refiner.box_prompt(scaled),
            mask_input=refiner.mask_prompt_logits(scaled),
            multimask_output=True,
        )
        np.testing.assert_array_equal(mask, masks[-1])
        assert score == pytest.approx(float(scores[-1]), abs=1e-6)


def test_frames_embedded_together_give_what_each_gives_alone():
    """Several cameras' frames (different sizes) in one encoder call: each one's embedding is
    its own up to float rounding, and its masks are the same."""
    frames = [frame(0), frame(1, 50, 30), frame(2, 64, 64)]
    together = SamRefiner(tiny_sam(0))
    together.set_images(frames)
    alone = SamRefiner(tiny_sam(0))
    for k, image in enumerate(frames):
        alone.set_images([image])
        torch.testing.assert_close(features(together, k), features(alone), rtol=0, atol=1e-5)
        points = [(3, 4), (20, 25), (25, 10)]
        no_maps = [None] * len(points)
        for (a, _), (b, _) in zip(
            together.refine(k, no_maps, points), alone.refine(0, no_maps, points)
        ):
            np.testing.assert_array_equal(a, b)


def test_warm_up_runs_nothing_uncompiled_on_the_cpu():
    refiner = SamRefiner(tiny_sam(0))
    calls = []
    refiner.predictor.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    refiner.warm_up(4)
    assert calls == []


def test_a_frame_is_embedded_once():
    refiner = SamRefiner(tiny_sam(0))
    calls = []
    refiner.predictor.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    image = frame(0)
    refiner.set_images([image])
    first = refiner.refine(0, [None], [POINTS[0]])[0][0]
    # The same pixels in another array, and again beside a new frame: cached.
    refiner.set_images([image.copy()])
    refiner.set_images([frame(1), image])
    assert len(calls) == 2
    np.testing.assert_array_equal(first, refiner.refine(1, [None], [POINTS[0]])[0][0])
    image[0, 0] += 1  # the caller's array changed in place: a new frame
    refiner.set_images([image])
    refiner.set_images([frame(2), frame(3)])
    assert len(calls) == 4


@pytest.mark.timeout(600)
@pytest.mark.skipif(
    shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler"
)
def test_compiled_encoder_gives_the_eager_masks():
    """warm_up builds the graphs of one and two frames; queries then compile nothing."""
    eager, compiled = SamRefiner(tiny_sam(0)), SamRefiner(tiny_sam(0), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    compiled.warm_up(2)
    assert counters["stats"]["unique_graphs"] == graphs + 2
    frames = [frame(0), frame(1)]
    for refiner in (eager, compiled):
        refiner.set_images(frames)
    compiled.set_images([frame(2)])
    compiled.set_images(frames)
    assert counters["stats"]["unique_graphs"] == graphs + 2
    for k in range(len(frames)):
        torch.testing.assert_close(features(compiled, k), features(eager, k), rtol=0, atol=1e-5)
        no_maps = [None] * len(POINTS)
        for (a, _), (b, _) in zip(
            eager.refine(k, no_maps, POINTS), compiled.refine(k, no_maps, POINTS)
        ):
            np.testing.assert_array_equal(a, b)
