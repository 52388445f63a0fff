"""Engine results and node state as ROS messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from groundlmm_msgs.msg import GroundedPhrase, GroundingResult
from groundlmm_ros.engine.types import Grounding
from groundlmm_ros.ros.conversion import image_to_numpy, mask_to_image, mask_to_png, png_to_mask

# How a GroundedPhrase carries its mask (GroundedPhrase.msg says how to read each): "full",
# mono8 of the source image's size; "cropped", mono8 of its bbox (the bbox gives the offset);
# "png", the full mask as a PNG file: far fewer bytes over a robot's network and in a terminal.
MASK_FORMATS = ("full", "cropped", "png")


@dataclass
class Tracks:
    """What tracking adds to a result: each phrase's track id (0: untracked) and lost flag;
    tracked: the phrases were tracked onto the frame, not grounded on it; last_grounded: the
    stamp of the frame they were grounded on (None: the result's own)."""

    ids: list[int]
    lost: list[bool]
    tracked: bool = False
    last_grounded: Time | None = None


def mask_message(
    mask: np.ndarray, bbox: tuple[int, int, int, int], header: Header, mask_format: str
) -> Image:
    """A (H, W) bool mask as a GroundedPhrase's mono8 mask, in `mask_format`."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(
            f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}"
        )
    if mask_format == "png":
        return mask_to_png(mask, header)
    if mask_format == "cropped":
        x, y, width, height = bbox
        if not width or not height:  # an empty mask: an empty image
            return Image(header=header, encoding="mono8")
        mask = mask[y : y + height, x : x + width]
    return mask_to_image(mask, header)


def phrase_mask(phrase: GroundedPhrase, image_size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: a GroundedPhrase's mask on its (H, W) source image, in any MASK_FORMATS."""
    if not phrase.mask.height or not phrase.mask.width:  # cropped, empty
        return np.zeros(image_size, bool)
    if phrase.mask.encoding == "png":
        pixels = png_to_mask(phrase.mask)
    else:
        pixels = image_to_numpy(phrase.mask) == 255
    if pixels.shape == tuple(image_size):
        return pixels
    box = phrase.bbox
    if pixels.shape != (box.height, box.width):
        raise ValueError(
            f"mask of {pixels.shape} fits neither the image {tuple(image_size)} nor the bbox "
            f"{(box.height, box.width)}"
        )
    full = np.zeros(image_size, bool)
    full[box.y_offset : box.y_offset + box.height, box.x_offset : box.x_offset + box.width] = pixels
    return full


def grounding_result(
    grounding: Grounding,
    header: Header,
    model: str,
    inference_time: float,
    centroids: list[np.ndarray],
    mask_format: str = "full",
    tracks: Tracks | None = None,
) -> GroundingResult:
    """A GroundingResult: header = the source image's; centroids are (3,) metres per phrase
    (NaN: unknown); masks in `mask_format` (MASK_FORMATS); `tracks`: the phrases' track ids
    and whether the result is tracked (None: a grounding without tracking)."""
    tracks = tracks or Tracks([0] * len(grounding.phrases), [False] * len(grounding.phrases))
    phrases = []
    for phrase, xyz, track_id, lost in zip(
        grounding.phrases, centroids, tracks.ids, tracks.lost, strict=True
    ):
        x, y, width, height = phrase.bbox
        phrases.append(
            GroundedPhrase(
                phrase=phrase.text,
                char_start=phrase.char_start,
                char_end=phrase.char_end,
                score=float(phrase.score),
                point_x=int(phrase.point[0]),
                point_y=int(phrase.point[1]),
                bbox=RegionOfInterest(
                    x_offset=int(x), y_offset=int(y), width=int(width), height=int(height)
                ),
                mask=mask_message(phrase.mask, phrase.bbox, header, mask_format),
                centroid=Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
                track_id=int(track_id),
                lost=bool(lost),
            )
        )
    return GroundingResult(
        header=header,
        success=True,
        query=grounding.query,
        mode=grounding.mode,
        answer=grounding.answer,
        phrases=phrases,
        model=model,
        inference_time=float(inference_time),
        source="tracked" if tracks.tracked else "grounded",
        last_grounded=tracks.last_grounded or header.stamp,
    )


def failed_result(
    query: str,
    mode: str,
    reason: str,
    header: Header | None,
    model: str,
    inference_time: float,
    source: str = "grounded",
) -> GroundingResult:
    """The GroundingResult of an accepted query that could not be grounded (or a frame that
    could not be tracked: source "tracked"): success false, message = why."""
    return GroundingResult(
        header=header or Header(),
        success=False,
        message=reason,
        query=query,
        mode=mode,
        model=model,
        inference_time=float(inference_time),
        source=source,
    )


def rejection(query: str, mode: str, source: str, camera: str, reason: str) -> DiagnosticStatus:
    """What `~/rejected` carries for a query that was never accepted: message = the reason."""
    values = [
        KeyValue(key="query", value=query),
        KeyValue(key="mode", value=mode),
        KeyValue(key="source", value=source),
        KeyValue(key="camera", value=camera),
    ]
    return DiagnosticStatus(
        level=DiagnosticStatus.WARN, name="groundlmm/query", message=reason, values=values
    )


def status_array(
    stamp, name: str, hardware_id: str, level: bytes, message: str, values: dict[str, object]
) -> DiagnosticArray:
    """One DiagnosticStatus for /diagnostics."""
    status = DiagnosticStatus(
        level=level,
        name=name,
        message=message,
        hardware_id=hardware_id,
        values=[KeyValue(key=key, value=str(value)) for key, value in values.items()],
    )
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])
