"""Evaluation metrics on hand-made results, and the CI check that the shipped demo model
grounds: the real engine, model to mask, on held-out scenes."""

import json

import numpy as np
import pytest
from cli_runs import run_cli

from groundlmm_ros.engine.types import GroundedPhrase, Grounding
from groundlmm_ros.evaluation import (
    held_out_scenes,
    mask_iou,
    match_describe,
    phrase_names,
    point_in_mask,
    score_describe,
    score_refer,
)
from groundlmm_ros.models.presets import demo_model_dir
from groundlmm_ros.world import SceneObject

pytestmark = pytest.mark.slow


def box(y0, y1, x0, x1, size=20):
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def phrase(text, mask, point=(0, 0)):
    return GroundedPhrase(
        text, 0, len(text), [0], np.zeros(mask.shape, np.float32), point, mask, 1.0, (0, 0, 0, 0)
    )


def grounding(*phrases):
    return Grounding("q", "describe", "answer", [1], list(phrases), (20, 20))


RED = SceneObject("red", "circle", (220, 30, 30), (5, 5), 5, 0.0, box(0, 10, 0, 10))
BLUE = SceneObject("blue", "star", (40, 70, 225), (15, 15), 5, 0.0, box(10, 20, 10, 20))


def test_iou_and_point():
    assert mask_iou(box(0, 10, 0, 10), box(0, 10, 5, 15)) == pytest.approx(50 / 150)
    assert mask_iou(box(0, 0, 0, 0), box(0, 0, 0, 0)) == 0.0
    assert point_in_mask((3, 2), box(0, 10, 0, 10)) and not point_in_mask(
        (12, 2), box(0, 10, 0, 10)
    )
    # Outside the image is a miss, not an error.
    assert not point_in_mask((25, 2), box(0, 10, 0, 10))


def test_describe_matching_is_greedy_one_to_one_and_checks_the_phrase():
    g = grounding(
        phrase("a red circle", box(0, 10, 0, 8)),  # IoU 0.8 with RED
        phrase("the blue star", box(0, 10, 0, 10)),  # IoU 1.0 with RED: wins RED, wrong name
        # IoU 0.5 with BLUE.
        phrase("a blue star", box(10, 20, 10, 15)),
    )
    assert match_describe(g, [RED, BLUE]) == [(1, 0, 1.0), (2, 1, 0.5)]
    recalled, iou_sum = score_describe(g, type("S", (), {"objects": [RED, BLUE]}))
    assert recalled == 1 and iou_sum == pytest.approx(1.5)
    assert phrase_names("There is a red circle.", RED) and not phrase_names("a red star", RED)


def test_refer_scoring():
    hit, iou = score_refer(grounding(phrase("the red circle", box(0, 10, 0, 5), point=(2, 3))), RED)
    assert hit and iou == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly one"):
        score_refer(grounding(), RED)


def test_held_out_scenes_are_fixed():
    a, b = held_out_scenes(3), held_out_scenes(5)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        held_out_scenes(0)


@pytest.mark.timeout(180)
def test_shipped_demo_model_grounds_on_held_out_scenes():
    """`groundlmm eval` on 100 held-out scenes with the weight-free colour fallback refiner."""
    assert (demo_model_dir() / "model.safetensors").is_file(), "the shipped demo model is missing"
    out = run_cli("eval", "--scenes", "100", "--threads", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stdout)
    assert metrics["scenes"] == 100
    assert metrics["refer_pointing_accuracy"] >= 0.5
    assert metrics["refer_pointing_accuracy"] >= 4 * metrics["random_pointing_accuracy"]
    assert metrics["describe_mask_recall"] >= 0.35
    # A point inside the object must give its mask: the colour refiner's IoU follows the point.
    assert metrics["refer_miou"] >= 0.9 * metrics["refer_pointing_accuracy"]
    # Its time (~20 s alone on a 2-core machine) is reported by pytest's
    # --durations, not asserted: a timed unit test fails on a loaded machine, not on slow code.
