"""Image conversion: round trips on every encoding, padded rows, both byte orders,
PNG/JPEG, every malformed case, and agreement with rosbags-image."""

import sys
import time

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.image import compressed_image_to_cvimage, image_to_cvimage, message_to_cvimage
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from groundlmm_ros.ros.conversion import (
    ImageConversionError,
    compressed_to_numpy,
    image_to_numpy,
    mask_to_image,
    numpy_to_image,
    pixel_layout,
    to_rgb8,
)

# encoding -> (channel dtype, channels)
ENCODINGS = {
    "rgb8": (np.uint8, 3),
    "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4),
    "bgra8": (np.uint8, 4),
    "mono8": (np.uint8, 1),
    "mono16": (np.uint16, 1),
    "rgb16": (np.uint16, 3),
    "bgr16": (np.uint16, 3),
    "rgba16": (np.uint16, 4),
    "bgra16": (np.uint16, 4),
    "bayer_rggb8": (np.uint8, 1),
    "bayer_gbrg16": (np.uint16, 1),
    "yuv422": (np.uint8, 2),
    "8UC1": (np.uint8, 1),
    "8UC3": (np.uint8, 3),
    "8SC1": (np.int8, 1),
    "16UC1": (np.uint16, 1),
    "16UC3": (np.uint16, 3),
    "16SC1": (np.int16, 1),
    "32SC1": (np.int32, 1),
    "32FC1": (np.float32, 1),
    "32FC3": (np.float32, 3),
    "64FC1": (np.float64, 1),
}
COLOUR_ENCODINGS = [
    "rgb8",
    "bgr8",
    "rgba8",
    "bgra8",
    "mono8",
    "mono16",
    "rgb16",
    "bgr16",
    "rgba16",
    "bgra16",
    "bayer_rggb8",
    "bayer_gbrg16",
    "yuv422",
]
HEADER = Header(stamp=Time(sec=17, nanosec=42), frame_id="camera_optical")


def random_pixels(encoding, height=5, width=7, seed=0):
    """(H, W) or (H, W, C) random pixels covering the dtype's range."""
    dtype, channels = ENCODINGS[encoding]
    shape = (height, width) if channels == 1 else (height, width, channels)
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(0, 1000, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def image_msg(pixels, encoding, pad=0, big_endian=False):
    """An Image built by hand: rows of `pad` garbage bytes after each, in the given byte order."""
    stored = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<"))
    rows = stored.reshape(pixels.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    return Image(
        header=HEADER,
        height=pixels.shape[0],
        width=pixels.shape[1],
        encoding=encoding,
        is_bigendian=big_endian,
        step=padded.shape[1],
        data=padded.tobytes(),
    )


def compressed_msg(pixels, extension, params=()):
    ok, encoded = cv2.imencode(extension, pixels, list(params))
    assert ok
    return CompressedImage(header=HEADER, format=extension[1:], data=encoded.tobytes())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_through_serialization(encoding):
    pixels = random_pixels(encoding)
    msg = numpy_to_image(pixels, encoding, HEADER)
    assert (msg.height, msg.width, msg.encoding, msg.header) == (5, 7, encoding, HEADER)
    assert msg.step == pixels[0].nbytes
    received = deserialize_message(serialize_message(msg), Image)
    back = image_to_numpy(received)
    assert back.dtype == pixels.dtype and back.shape == pixels.shape
    np.testing.assert_array_equal(back, pixels)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("big_endian", [False, True])
def test_same_pixels_as_rosbags_image(encoding, big_endian):
    pixels = random_pixels(encoding, seed=1)
    msg = image_msg(pixels, encoding, big_endian=big_endian)
    ours = image_to_numpy(msg)
    np.testing.assert_array_equal(ours, pixels)
    np.testing.assert_array_equal(ours, image_to_cvimage(msg))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("big_endian", [False, True])
def test_padded_rows_are_skipped(encoding, big_endian):
    pixels = random_pixels(encoding, seed=2)
    padded = image_msg(pixels, encoding, pad=13, big_endian=big_endian)
    assert padded.step == pixels[0].nbytes + 13
    np.testing.assert_array_equal(image_to_numpy(padded), pixels)
    # rosbags-image ignores step; on the unpadded message it must agree with our padded read.
    np.testing.assert_array_equal(
        image_to_numpy(padded), image_to_cvimage(image_msg(pixels, encoding))
    )


@pytest.mark.parametrize("encoding", COLOUR_ENCODINGS)
@pytest.mark.parametrize("pad", [0, 5])
def test_to_rgb8_matches_rosbags_image(encoding, pad):
    pixels = random_pixels(encoding, height=6, width=8, seed=3)
    rgb = to_rgb8(image_msg(pixels, encoding, pad=pad))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, message_to_cvimage(image_msg(pixels, encoding), "rgb8"))


def test_to_rgb8_channel_orders():
    rgb = random_pixels("rgb8", seed=4)
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(rgb, "rgb8")), rgb)
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(rgb[..., ::-1], "bgr8")), rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(rgba, "rgba8")), rgb)
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(rgba[..., [2, 1, 0, 3]], "bgra8")), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(grey, "mono8")), np.dstack([grey] * 3))
    grey16 = np.array([[0, 257, 65535]], np.uint16)  # scaled by 255/65535: 0, 1, 255
    np.testing.assert_array_equal(to_rgb8(numpy_to_image(grey16, "mono16"))[..., 1], [[0, 1, 255]])


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1", "8UC3", "32FC3"])
def test_to_rgb8_refuses_encodings_without_colours(encoding):
    with pytest.raises(ImageConversionError, match=f"encoding '{encoding}' names no colours"):
        to_rgb8(numpy_to_image(random_pixels(encoding), encoding))


def test_big_endian_16_bit_values():
    depth_mm = np.array([[1, 256, 1000], [65535, 0, 4660]], np.uint16)
    msg = Image(
        height=2,
        width=3,
        encoding="16UC1",
        is_bigendian=True,
        step=6,
        data=depth_mm.astype(">u2").tobytes(),
    )
    assert msg.data[:2].tobytes() == b"\x00\x01"  # really stored big-endian
    depth = image_to_numpy(msg)
    assert depth.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(depth, depth_mm)
    # A big-endian array keeps its byte order on the wire and says so.
    out = numpy_to_image(depth_mm.astype(">u2"), "16UC1")
    assert out.is_bigendian and bytes(out.data) == bytes(msg.data)
    assert numpy_to_image(depth_mm, "16UC1").is_bigendian == (sys.byteorder == "big")


def test_reads_are_zero_copy_views():
    frame = np.random.default_rng(5).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    for msg in (numpy_to_image(frame, "rgb8"), image_msg(frame, "rgb8", pad=64)):
        wire = np.frombuffer(msg.data, np.uint8)
        assert np.shares_memory(image_to_numpy(msg), wire)
        assert np.shares_memory(to_rgb8(msg), wire)
        durations = []
        for _ in range(20):
            start = time.perf_counter()
            image_to_numpy(msg)
            durations.append(time.perf_counter() - start)
        # A copy of 6 MB takes ~1 ms and list(msg.data) ~300 ms; a view takes microseconds.
        assert sorted(durations)[10] < 0.5e-3


def test_other_byte_order_is_swapped_into_a_copy():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    foreign = image_msg(values, "32FC1", big_endian=sys.byteorder == "little")
    swapped = image_to_numpy(foreign)
    assert swapped.dtype.isnative and not np.shares_memory(
        swapped, np.frombuffer(foreign.data, np.uint8)
    )
    np.testing.assert_array_equal(swapped, values)


def test_mask_to_image():
    mask = np.zeros((480, 640), bool)
    mask[100:200, 300:420] = True
    msg = mask_to_image(mask, HEADER)
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.header) == (
        "mono8",
        480,
        640,
        640,
        HEADER,
    )
    assert set(np.unique(image_to_numpy(msg))) == {0, 255}
    np.testing.assert_array_equal(image_to_numpy(msg) == 255, mask)


def test_compressed_png_colour_grey_alpha_and_16_bit():
    bgr = random_pixels("bgr8", height=9, width=11, seed=6)
    png = compressed_msg(bgr, ".png")
    np.testing.assert_array_equal(compressed_to_numpy(png), bgr)
    np.testing.assert_array_equal(compressed_to_numpy(png), compressed_image_to_cvimage(png))
    np.testing.assert_array_equal(to_rgb8(png), bgr[..., ::-1])
    np.testing.assert_array_equal(to_rgb8(png), message_to_cvimage(png, "rgb8"))

    grey = bgr[..., 0].copy()
    decoded = compressed_to_numpy(compressed_msg(grey, ".png"))
    assert decoded.shape == (9, 11)
    np.testing.assert_array_equal(decoded, grey)
    np.testing.assert_array_equal(to_rgb8(compressed_msg(grey, ".png")), np.dstack([grey] * 3))

    bgra = random_pixels("bgra8", height=9, width=11, seed=7)
    np.testing.assert_array_equal(compressed_to_numpy(compressed_msg(bgra, ".png")), bgra)
    np.testing.assert_array_equal(to_rgb8(compressed_msg(bgra, ".png")), bgra[..., [2, 1, 0]])

    depth_mm = random_pixels("16UC1", height=9, width=11, seed=8)
    decoded = compressed_to_numpy(compressed_msg(depth_mm, ".png"))
    assert decoded.dtype == np.uint16  # rosbags-image would have cut it to 8 bits
    np.testing.assert_array_equal(decoded, depth_mm)


def test_compressed_jpeg():
    # A smooth picture, so JPEG's loss stays small.
    y, x = np.mgrid[0:48, 0:64]
    bgr = np.dstack([x * 4, y * 5, (x + y) * 2]).astype(np.uint8)
    jpeg = compressed_msg(bgr, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))
    decoded = compressed_to_numpy(jpeg)
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - bgr).mean() < 2.0
    np.testing.assert_array_equal(decoded, compressed_image_to_cvimage(jpeg))
    np.testing.assert_array_equal(to_rgb8(jpeg), decoded[..., ::-1])


def valid_rgb8():
    return numpy_to_image(random_pixels("rgb8"), "rgb8")  # 5 x 7, step 21


def with_fields(msg, **fields):
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "msg, problem",
    [
        (
            with_fields(valid_rgb8(), data=bytes(5 * 21 - 1)),
            r"data has 104 bytes, expected height \* step = 5 \* 21 = 105",
        ),
        (
            with_fields(valid_rgb8(), step=20),
            r"step=20 is below width \* bytes per pixel = 7 \* 3 = 21",
        ),
        (with_fields(valid_rgb8(), encoding="rgb9"), r"unknown encoding 'rgb9'"),
        (with_fields(valid_rgb8(), encoding=""), r"unknown encoding ''"),
        (with_fields(valid_rgb8(), encoding="nv12"), r"encoding 'nv12' is planar YUV"),
        (
            with_fields(valid_rgb8(), encoding="8UC0"),
            r"encoding '8UC0' has 0 channels, expected at least 1",
        ),
        (with_fields(valid_rgb8(), width=0), r"empty image: height=5, width=0"),
        (with_fields(valid_rgb8(), height=0, data=b""), r"empty image: height=0, width=7"),
        (
            with_fields(numpy_to_image(random_pixels("16UC1"), "16UC1"), step=13),
            r"step=13 is below width \* bytes per pixel = 7 \* 2 = 14",
        ),
    ],
)
def test_malformed_image_is_named(msg, problem):
    with pytest.raises(ImageConversionError, match=problem):
        image_to_numpy(msg)
    with pytest.raises(ImageConversionError, match=problem):
        to_rgb8(msg)


def test_yuv422_of_odd_width_is_refused_by_name():
    """Its layout is fine (2 bytes a pixel) but a YUV pair needs two pixels: OpenCV refuses, named
    here."""
    msg = Image(width=3, height=1, encoding="yuv422", step=6, data=bytes(6))
    with pytest.raises(
        ImageConversionError, match=r"encoding 'yuv422' cannot be converted to rgb8: sz.width % 2"
    ):
        to_rgb8(msg)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", r"CompressedImage data is empty"),
        (
            b"\x89PNG\r\n\x1a\n" + bytes(40),
            r"CompressedImage data \(48 bytes, format 'png'\) is not an image",
        ),
        (b"not an image at all", r"not an image OpenCV can decode"),
    ],
)
def test_undecodable_compressed_image_is_named(data, problem):
    msg = CompressedImage(format="png", data=data)
    with pytest.raises(ImageConversionError, match=problem):
        compressed_to_numpy(msg)
    with pytest.raises(ImageConversionError, match=problem):
        to_rgb8(msg)


@pytest.mark.parametrize(
    "array, encoding, problem",
    [
        (
            np.zeros((4, 4, 3), np.uint16),
            "rgb8",
            r"shape \(4, 4, 3\) and dtype uint16 does not fit encoding 'rgb8'",
        ),
        (np.zeros((4, 4), np.uint8), "rgb8", r"expected shape \(H, W, 3\) and dtype uint8"),
        (np.zeros((4, 4, 3), np.float32), "32FC1", r"expected shape \(H, W\) and dtype float32"),
        (np.zeros(16, np.uint8), "mono8", r"shape \(16,\)"),
        (np.zeros((0, 4), np.uint8), "mono8", r"empty array: shape \(0, 4\)"),
        (np.zeros((4, 4), np.uint8), "jpeg", r"unknown encoding 'jpeg'"),
    ],
)
def test_array_that_does_not_fit_its_encoding_is_named(array, encoding, problem):
    with pytest.raises(ImageConversionError, match=problem):
        numpy_to_image(array, encoding)


@pytest.mark.parametrize("mask", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1), bool)])
def test_mask_must_be_2d_bool(mask):
    with pytest.raises(ImageConversionError, match="mask must be a"):
        mask_to_image(mask, HEADER)


def test_pixel_layout():
    assert pixel_layout("bgra8") == (np.dtype(np.uint8), 4)
    assert pixel_layout("32FC3") == (np.dtype(np.float32), 3)
    assert issubclass(ImageConversionError, ValueError)


def test_rows_misaligned_for_their_dtype_are_packed():
    depth_mm = random_pixels("16UC1", seed=9)
    depth = image_to_numpy(image_msg(depth_mm, "16UC1", pad=1))  # step 15: rows start at odd bytes
    assert depth.flags.c_contiguous
    np.testing.assert_array_equal(
        cv2.resize(depth, (14, 10), interpolation=cv2.INTER_NEAREST)[::2, ::2], depth_mm
    )
