"""sensor_msgs Image / CompressedImage <-> numpy arrays, for the node.

Reads are zero-copy: the returned array is a view of the message's own buffer
(`np.ndarray(buffer=msg.data)`; `list(msg.data)` would cost ~30 ms per
640x480 frame). Writes go through `arr.tobytes()`, the fast way into an rclpy
uint8[] field.

The library: PyPI's cv-bridge is the ROS 1 code and broken with numpy 2, so
rosbags-image supplies the encoding table (`to_cvtype`) and the colour
conversions (`convert_color`). Its message readers are not used: they ignore
`step` (a padded row shears the picture), do not check the data length, fail
on undecodable compressed data with a bare AssertionError and decode a 16-bit
PNG to 8 bits. test_conversion.py checks the readers here against
rosbags-image on every encoding both read correctly.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import rosbags.image as rosbags_image
from rosbags.image.image import Format, convert_color, to_cvtype
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header


class ImageConversionError(ValueError):
    """An image message or array that cannot be converted; says which field and why."""


# Planar YUV 4:2:0 holds 1.5 byte rows per image row: no (H, W, C) view of it exists.
_PLANAR_ENCODINGS = ("nv12", "nv21")

# What cv2.imdecode returns, by (dtype, channels), named as a ROS encoding.
_DECODED_ENCODINGS = {
    (np.dtype(np.uint8), 1): "mono8",
    (np.dtype(np.uint8), 3): "bgr8",
    (np.dtype(np.uint8), 4): "bgra8",
    (np.dtype(np.uint16), 1): "mono16",
    (np.dtype(np.uint16), 3): "bgr16",
    (np.dtype(np.uint16), 4): "bgra16",
}


def pixel_layout(encoding: str) -> tuple[np.dtype, int]:
    """(native-order dtype of one channel, channels per pixel) of a ROS image encoding."""
    if encoding in _PLANAR_ENCODINGS:
        raise ImageConversionError(
            f"encoding {encoding!r} is planar YUV 4:2:0, which is not supported"
        )
    try:
        _, _, typestr, channels = to_cvtype(encoding)
    except rosbags_image.ImageFormatError:
        raise ImageConversionError(
            f"unknown encoding {encoding!r}: expected e.g. rgb8, bgr8, rgba8, bgra8, mono8, "
            "mono16, "
            "rgb16, bayer_rggb8, yuv422, or <8U|8S|16U|16S|32S|32F|64F>C<n> such as 16UC1, 32FC1"
        ) from None
    if channels < 1:
        raise ImageConversionError(
            f"encoding {encoding!r} has {channels} channels, expected at least 1"
        )
    return np.dtype(typestr), channels


def image_to_numpy(msg: Image) -> np.ndarray:
    """The pixels of an Image as (H, W) or (H, W, C), in the encoding's own channel order and dtype.

    A view of msg.data (no copy), rows `step` bytes apart, so padded rows are
    skipped in place. Copied only where a view would not do: data of the other
    byte order (is_bigendian differing from this machine) is swapped to native
    order, and rows whose step is not a multiple of the channel size are
    packed (OpenCV and torch refuse such strides).
    """
    dtype, channels = pixel_layout(msg.encoding)
    height, width, step = msg.height, msg.width, msg.step
    if height == 0 or width == 0:
        raise ImageConversionError(f"empty image: height={height}, width={width}, both must be > 0")
    pixel_bytes = channels * dtype.itemsize
    if step < width * pixel_bytes:
        raise ImageConversionError(
            f"step={step} is below width * bytes per pixel = {width} * {pixel_bytes} = "
            f"{width * pixel_bytes} for encoding {msg.encoding!r}"
        )
    if len(msg.data) < height * step:
        raise ImageConversionError(
            f"data has {len(msg.data)} bytes, expected height * step = "
            f"{height} * {step} = {height * step}"
        )
    shape = (height, width) if channels == 1 else (height, width, channels)
    strides = (step, pixel_bytes) if channels == 1 else (step, pixel_bytes, dtype.itemsize)
    stored = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    pixels = np.ndarray(shape, stored, buffer=msg.data, strides=strides)
    if not pixels.dtype.isnative or step % dtype.itemsize:
        pixels = pixels.astype(dtype.newbyteorder("="), order="C")
    return pixels


def compressed_to_numpy(msg: CompressedImage) -> np.ndarray:
    """A decoded PNG/JPEG (any format OpenCV reads) in OpenCV's layout.

    (H, W) for grey, (H, W, 3) BGR, (H, W, 4) BGRA; uint8, or uint16 for a
    16-bit PNG (a depth image stays in its units).
    """
    if len(msg.data) == 0:
        raise ImageConversionError(f"CompressedImage data is empty (format {msg.format!r})")
    # IMREAD_UNCHANGED keeps 16 bits and alpha, which rosbags-image's IMREAD_ANYCOLOR drops.
    pixels = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageConversionError(
            f"CompressedImage data ({len(msg.data)} bytes, format {msg.format!r}) "
            "is not an image OpenCV can decode"
        )
    return pixels


def to_rgb8(msg: Image | CompressedImage) -> np.ndarray:
    """The image as (H, W, 3) uint8 RGB, what the engine takes.

    Colour and mono encodings only: mono is replicated into three channels,
    bgr/bgra/bayer/yuv422 are converted, and 16-bit colour or mono is scaled by
    255/65535. Encodings that name no colours (depth and raw data such as
    16UC1, 32FC1, 8UC3) raise ImageConversionError: guessing their meaning
    would hand the model a wrong picture. An rgb8 Image comes back as a view
    of msg.data (not contiguous if its rows are padded).
    """
    if hasattr(msg, "format"):  # a CompressedImage (rosbags-image tells them apart the same way)
        pixels = compressed_to_numpy(msg)
        encoding = _DECODED_ENCODINGS.get(
            (pixels.dtype, 1 if pixels.ndim == 2 else pixels.shape[2])
        )
        if encoding is None:
            raise ImageConversionError(
                f"CompressedImage decoded to {pixels.dtype} with shape {pixels.shape}, "
                "which is not a colour image"
            )
    else:
        pixels = image_to_numpy(msg)
        encoding = msg.encoding
    if to_cvtype(encoding)[1] == Format.GENERIC:
        raise ImageConversionError(
            f"encoding {encoding!r} names no colours (depth or raw data); "
            "expected a colour or mono "
            "encoding such as rgb8, bgr8, rgba8, bgra8, mono8, mono16"
        )
    try:
        return convert_color(pixels, encoding, "rgb8")
    except (
        rosbags_image.ImageConversionError,
        cv2.error,
    ) as error:  # OpenCV refuses e.g. yuv422 of odd width
        reason = error.err if isinstance(error, cv2.error) else error
        raise ImageConversionError(
            f"encoding {encoding!r} cannot be converted to rgb8: {reason}"
        ) from None


def numpy_to_image(array: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """An Image holding `array`: (H, W) or (H, W, C) in `encoding`'s channel order and dtype.

    Unpadded rows (step = width * bytes per pixel); the array's byte order is
    kept and stated in is_bigendian.
    """
    dtype, channels = pixel_layout(encoding)
    array_channels = array.shape[2] if array.ndim == 3 else 1
    if (
        array.ndim not in (2, 3)
        or array_channels != channels
        or array.dtype.newbyteorder("=") != dtype
    ):
        raise ImageConversionError(
            f"array of shape {array.shape} and dtype {array.dtype} "
            f"does not fit encoding {encoding!r}: "
            f"expected shape (H, W{'' if channels == 1 else f', {channels}'}) and dtype {dtype}"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageConversionError(f"empty array: shape {array.shape}")
    big_endian = array.dtype.byteorder == ">" or (
        array.dtype.byteorder == "=" and sys.byteorder == "big"
    )
    return Image(
        header=header if header is not None else Header(),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=big_endian,
        step=width * channels * dtype.itemsize,
        data=array.tobytes(),
    )


def _mask_pixels(mask: np.ndarray) -> np.ndarray:
    """A (H, W) bool mask as mono8 pixels: 0 background, 255 foreground."""
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ImageConversionError(
            f"mask must be a (H, W) bool array, got shape {mask.shape} and dtype {mask.dtype}"
        )
    return mask.astype(np.uint8) * np.uint8(255)


def mask_to_image(mask: np.ndarray, header: Header) -> Image:
    """A (H, W) bool mask as a mono8 Image: 0 background, 255 foreground."""
    return numpy_to_image(_mask_pixels(mask), "mono8", header)


def mask_to_png(mask: np.ndarray, header: Header) -> Image:
    """A (H, W) bool mask as an Image of encoding "png": data is a PNG file of the mono8 mask
    (lossless; a few KB where the mono8 Image has H * W bytes), height and width the mask's,
    step 0 (the data has no rows)."""
    _, png = cv2.imencode(".png", _mask_pixels(mask))
    height, width = mask.shape
    return Image(header=header, height=height, width=width, encoding="png", data=png.tobytes())


def png_to_mask(msg: Image) -> np.ndarray:
    """(H, W) bool: the mask in an Image of encoding "png" (mask_to_png's)."""
    pixels = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint8 or pixels.shape != (msg.height, msg.width):
        found = "no image" if pixels is None else f"{pixels.dtype} of shape {pixels.shape}"
        raise ImageConversionError(
            f"png mask data ({len(msg.data)} bytes) decodes to {found}, expected an 8-bit grey "
            f"image of {msg.height} x {msg.width}"
        )
    return pixels == 255
