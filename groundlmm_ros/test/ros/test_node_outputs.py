"""The node's outputs built in process: GroundingResult fields, the overlay, markers."""

from dataclasses import replace

import cv2
import numpy as np
from std_msgs.msg import Header

from groundlmm_ros.engine.types import GroundedPhrase, Grounding
from groundlmm_ros.ros import messages, visualization


def grounding() -> Grounding:
    masks = [np.zeros((40, 60), bool) for _ in range(2)]  # (H, W)
    masks[0][5:15, 10:30] = True
    masks[1][20:35, 40:55] = True
    phrases = [
        GroundedPhrase(
            "a red mug",
            9,
            18,
            [3, 4],
            np.zeros((40, 60), np.float32),
            (20, 10),
            masks[0],
            0.75,
            (10, 5, 20, 10),
        ),
        GroundedPhrase(
            "the table",
            22,
            31,
            [6],
            np.zeros((40, 60), np.float32),
            (47, 27),
            masks[1],
            1.0,
            (40, 20, 15, 15),
        ),
    ]
    return Grounding(
        "Describe.",
        "describe",
        "There is a red mug on the table.",
        list(range(9)),
        phrases,
        (40, 60),
    )


def test_grounding_result_carries_every_phrase_field():
    header = Header(frame_id="cam")
    header.stamp.sec = 7
    result = messages.grounding_result(
        grounding(), header, "tiny-random", 0.25, [np.array([0.1, 0.2, 0.9]), np.full(3, np.nan)]
    )
    assert (result.header, result.query, result.mode, result.model) == (
        header,
        "Describe.",
        "describe",
        "tiny-random",
    )
    assert result.answer[result.phrases[0].char_start : result.phrases[0].char_end] == "a red mug"
    first, second = result.phrases
    assert (first.point_x, first.point_y, first.score) == (20, 10, 0.75)
    assert (first.bbox.x_offset, first.bbox.y_offset, first.bbox.width, first.bbox.height) == (
        10,
        5,
        20,
        10,
    )
    mask = np.frombuffer(first.mask.data, np.uint8).reshape(40, 60)
    assert np.array_equal(mask > 0, grounding().phrases[0].mask) and first.mask.header == header
    assert np.isclose(first.centroid.z, 0.9) and np.isnan(second.centroid.x)


def test_overlay_lightens_masks_outlines_them_and_leaves_the_background():
    rgb = np.full((40, 60, 3), 100, np.uint8)
    canvas = visualization.overlay(rgb, grounding())
    assert canvas.shape == rgb.shape and canvas.dtype == np.uint8
    # inside, between the outline and the point's ring at (20, 10): lightened grey
    assert np.allclose(canvas[11, 12], 100 + 0.3 * (255 - 100), atol=1)
    # the mask's edge in the phrase's colour; outside every mask, the image as it was
    assert (canvas[5, 27] == visualization.PALETTE[0]).all()
    assert (canvas[24, 54] == visualization.PALETTE[1]).all()
    assert (canvas[38, 2] == rgb[38, 2]).all()


def test_overlay_keeps_a_masked_object_in_its_own_colour():
    # A blue mug under any phrase's mask stays blue (a 50 % tint with the first phrase's red
    # turned it purple); the phrase's colour is in the outline.
    blue = np.array([20, 40, 200], np.uint8)
    rgb = np.full((40, 60, 3), 100, np.uint8)
    rgb[5:15, 10:30] = blue
    mug = replace(grounding().phrases[0], point=(55, 35))
    for index, colour in enumerate(visualization.PALETTE):
        empty = replace(mug, mask=np.zeros((40, 60), bool), bbox=(0, 0, 0, 0))
        phrases = [empty] * index + [mug]
        canvas = visualization.overlay(rgb, replace(grounding(), phrases=phrases))
        inside = canvas[8:12, 13:27].reshape(-1, 3)
        hue = cv2.cvtColor(inside[None], cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
        blue_hue = int(cv2.cvtColor(blue[None, None], cv2.COLOR_RGB2HSV)[0, 0, 0])
        assert np.abs(hue - blue_hue).max() <= 2, f"phrase {index}: hue {hue.max()}"
        assert (inside[:, 2] > inside[:, :2].max(axis=1) + 100).all()
        assert (canvas[5, 22] == colour).all()


def test_overlay_of_an_empty_mask_tints_nothing():
    rgb = np.full((2, 3, 3), 100, np.uint8)  # a frame so small that the mask came out empty
    empty = GroundedPhrase(
        "a mug",
        0,
        5,
        [0],
        np.zeros((2, 3), np.float32),
        (1, 1),
        np.zeros((2, 3), bool),
        0.1,
        (0, 0, 0, 0),
    )
    canvas = visualization.overlay(
        rgb, Grounding("Describe.", "describe", "a mug", [0], [empty], (2, 3))
    )
    assert canvas.shape == rgb.shape and canvas.dtype == np.uint8


def test_markers_only_for_phrases_with_a_centroid():
    array = visualization.markers(
        grounding(), [np.array([0.1, 0.2, 0.9]), np.full(3, np.nan)], Header(), 1.5
    )
    assert len(array.markers) == 2  # sphere + label of the first phrase
    assert array.markers[1].text == "a red mug" and np.isclose(
        array.markers[0].pose.position.z, 0.9
    )
    assert (array.markers[0].lifetime.sec, array.markers[0].lifetime.nanosec) == (1, 500_000_000)


def test_tracked_results_carry_track_ids_and_the_labels_name_them():
    header = Header(frame_id="cam")
    header.stamp.sec = 12
    grounded_on = Header().stamp
    grounded_on.sec = 10
    tracks = messages.Tracks([3, 4], [False, True], tracked=True, last_grounded=grounded_on)
    centroids = [np.full(3, np.nan)] * 2
    result = messages.grounding_result(grounding(), header, "demo", 0.01, centroids, tracks=tracks)
    assert result.source == "tracked" and result.last_grounded.sec == 10
    assert [(p.track_id, p.lost) for p in result.phrases] == [(3, False), (4, True)]
    plain = messages.grounding_result(grounding(), header, "demo", 0.01, centroids)
    assert plain.source == "grounded" and plain.last_grounded == header.stamp
    assert [(p.track_id, p.lost) for p in plain.phrases] == [(0, False), (0, False)]
    array = visualization.markers(
        grounding(),
        [np.array([0.1, 0.2, 0.9]), np.full(3, np.nan)],
        header,
        1.0,
        ["#3 a red mug", "#4 the table"],
    )
    assert array.markers[1].text == "#3 a red mug"
    rgb = np.zeros((40, 60, 3), np.uint8)
    labelled = visualization.overlay(rgb, grounding(), ["#3 a red mug", "#4 the table"])
    assert not np.array_equal(labelled, visualization.overlay(rgb, grounding()))
