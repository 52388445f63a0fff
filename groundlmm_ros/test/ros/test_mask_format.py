"""GroundedPhrase masks in every format: `cropped` carries only the bbox and `png` a PNG file of
the full mask; both decode to the same pixels as `full`, and a result with ten 640x480 masks
shrinks accordingly."""

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from rclpy.serialization import serialize_message
from std_msgs.msg import Header

from groundlmm_ros.engine.engine import mask_bbox
from groundlmm_ros.engine.types import GroundedPhrase, Grounding
from groundlmm_ros.ros.messages import MASK_FORMATS, grounding_result, mask_message, phrase_mask
from groundlmm_ros.ros.params import check_parameters

HEADER = Header(frame_id="camera")
H, W = 480, 640


def grounding(masks) -> Grounding:
    phrases = [
        GroundedPhrase(
            f"thing {i}", 0, 5, [0], np.zeros((H, W), np.float32), (0, 0), m, 0.9, mask_bbox(m)
        )
        for i, m in enumerate(masks)
    ]
    return Grounding("q", "describe", "thing", [1], phrases, (H, W))


def masks(count=10, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        m = np.zeros((H, W), bool)
        y, x = rng.integers(0, H - 60), rng.integers(0, W - 80)
        m[y : y + rng.integers(5, 60), x : x + rng.integers(5, 80)] = True
        m[y, x + 2] = False  # not a plain rectangle
        out.append(m)
    return out + [np.zeros((H, W), bool), np.ones((H, W), bool)]  # empty and whole-image masks


def test_cropped_and_png_masks_decode_to_the_full_pixels():
    given = masks()
    results = {
        f: grounding_result(
            grounding(given), HEADER, "m", 0.1, [np.full(3, np.nan)] * len(given), f
        )
        for f in MASK_FORMATS
    }
    for full, cropped, png, expected in zip(
        results["full"].phrases, results["cropped"].phrases, results["png"].phrases, given
    ):
        assert (full.mask.height, full.mask.width) == (H, W)
        assert (png.mask.encoding, png.mask.height, png.mask.width) == ("png", H, W)
        assert png.mask.header.frame_id == "camera"
        np.testing.assert_array_equal(phrase_mask(png, (H, W)), expected)
        assert (cropped.mask.height, cropped.mask.width) == (
            cropped.bbox.height,
            cropped.bbox.width,
        )
        assert cropped.mask.header.frame_id == "camera"
        np.testing.assert_array_equal(phrase_mask(full, (H, W)), expected)
        np.testing.assert_array_equal(phrase_mask(cropped, (H, W)), expected)
    assert results["cropped"].phrases[-2].mask.data.tobytes() == b""  # the empty mask: 0 x 0


def test_a_png_mask_is_the_full_mono8_mask_for_any_png_reader():
    # What GroundedPhrase.msg tells a planner: a standard PNG reader (Pillow here, not the
    # OpenCV that wrote it) gives the `full` format's mono8 pixels, byte for byte.
    given = masks()
    results = {
        f: grounding_result(grounding(given), HEADER, "m", 0.1, [np.zeros(3)] * len(given), f)
        for f in ("full", "png")
    }
    for full, png in zip(results["full"].phrases, results["png"].phrases):
        decoded = PILImage.open(io.BytesIO(png.mask.data.tobytes()))
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "L", (W, H))
        assert np.asarray(decoded).tobytes() == full.mask.data.tobytes()


def test_a_corrupt_png_mask_is_refused_with_the_reason():
    phrase = grounding_result(grounding(masks()[:1]), HEADER, "m", 0.1, [np.zeros(3)], "png")
    mask = phrase.phrases[0].mask
    mask.data = mask.data.tobytes()[:20]
    with pytest.raises(ValueError, match="decodes to no image, expected an 8-bit grey image"):
        phrase_mask(phrase.phrases[0], (H, W))


def test_ten_cropped_masks_cross_the_network_in_a_fraction_of_the_bytes():
    given = masks()[:10]
    size = {
        f: len(
            serialize_message(
                grounding_result(grounding(given), HEADER, "m", 0.1, [np.zeros(3)] * 10, f)
            )
        )
        for f in MASK_FORMATS
    }
    assert size["full"] > 10 * H * W  # ten mono8 images of the frame's size
    assert size["cropped"] < size["full"] / 20
    assert size["png"] < size["full"] / 100


def test_bad_format_and_mismatched_masks_are_refused():
    mask = np.zeros((H, W), bool)
    with pytest.raises(ValueError, match="mask_format must be one of full, cropped, png"):
        mask_message(mask, (0, 0, 0, 0), HEADER, "rle")
    assert "expected one of full, cropped, png" in check_parameters({"mask_format": "rle"})
    phrase = grounding_result(grounding([mask]), HEADER, "m", 0.1, [np.zeros(3)]).phrases[0]
    with pytest.raises(ValueError, match="fits neither the image"):
        phrase_mask(phrase, (H + 1, W))
