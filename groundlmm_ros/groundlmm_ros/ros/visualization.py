"""What RViz shows: the image with coloured masks, points and labels; markers at 3D centroids."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import yaml
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Pose, Vector3
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from groundlmm_ros.engine.types import Grounding

# Distinct RGB colours, one per phrase in turn.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
    ],
    dtype=np.uint8,
)


def overlay(
    rgb: np.ndarray, grounding: Grounding, labels: list[str] | None = None, lighten: float = 0.3
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: rgb with each phrase's mask lightened and outlined in its palette
    colour, its point ringed and its label written (labels[i], default its text).

    The mask is lightened towards white, not tinted with its colour: mixing with white keeps
    every pixel's hue, so a blue object stays blue (a 50 % red tint turned it purple); the
    outline says which phrase it is.
    """
    canvas = rgb.copy()
    for index, phrase in enumerate(grounding.phrases):
        # Within the mask's bbox only (object-sized masks: a fraction of whole-image passes).
        x, y, width, height = phrase.bbox
        region = canvas[y : y + height, x : x + width]  # a view into canvas
        if region.size == 0:  # an empty mask (its bbox has no pixels): nothing to draw
            continue
        inside = np.ascontiguousarray(phrase.mask[y : y + height, x : x + width], np.uint8)
        white = np.full_like(region, 255)
        np.copyto(
            region,
            cv2.addWeighted(region, 1 - lighten, white, lighten, 0),
            where=inside[..., None] > 0,
        )
        outline, _ = cv2.findContours(
            inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x, y)
        )
        colour = tuple(int(c) for c in PALETTE[index % len(PALETTE)])
        cv2.drawContours(canvas, outline, -1, colour, 2)
    labels = labels or [phrase.text for phrase in grounding.phrases]
    for index, (phrase, label) in enumerate(zip(grounding.phrases, labels, strict=True)):
        colour = tuple(int(c) for c in PALETTE[index % len(PALETTE)])
        cv2.circle(canvas, phrase.point, 6, (255, 255, 255), 2)
        cv2.circle(canvas, phrase.point, 3, colour, -1)
        origin = (phrase.point[0] + 8, max(phrase.point[1] - 8, 12))
        cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return canvas


def markers(
    grounding: Grounding,
    centroids: list[np.ndarray],
    header: Header,
    lifetime_s: float,
    labels: list[str] | None = None,
) -> MarkerArray:
    """A sphere and a text label (labels[i], default the phrase's text) at each phrase's 3D
    centroid (phrases without one are skipped)."""
    labels = labels or [phrase.text for phrase in grounding.phrases]
    lifetime = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1) * 1e9))
    array = MarkerArray()
    for index, (label, xyz) in enumerate(zip(labels, centroids, strict=True)):
        if not np.all(np.isfinite(xyz)):
            continue
        r, g, b = (PALETTE[index % len(PALETTE)] / 255.0).tolist()
        position = Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))
        common = dict(
            header=header,
            ns="groundlmm",
            action=Marker.ADD,
            lifetime=lifetime,
            pose=Pose(position=position),
        )
        array.markers.append(
            Marker(
                id=2 * index,
                type=Marker.SPHERE,
                scale=Vector3(x=0.05, y=0.05, z=0.05),
                color=ColorRGBA(r=r, g=g, b=b, a=0.9),
                **common,
            )
        )
        common["pose"] = Pose(position=Point(x=position.x, y=position.y - 0.06, z=position.z))
        array.markers.append(
            Marker(
                id=2 * index + 1,
                type=Marker.TEXT_VIEW_FACING,
                text=label,
                scale=Vector3(z=0.05),
                color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0),
                **common,
            )
        )
    return array


def rviz_config(template: str, node: str, cameras: list[str], fixed_frame: str) -> str:
    """RViz's config (YAML) for the groundlmm_node named `node` (fully qualified, e.g.
    `/robot/groundlmm_node`): the template's displays of the node's outputs (overlay, markers,
    points) once per camera on that camera's topics, and `fixed_frame` (the camera's optical
    frame) as the fixed frame. The template (config/groundlmm.rviz) is the config of a node
    without namespace and with the plain camera; its topics name the outputs."""
    config = yaml.safe_load(template)
    manager = config["Visualization Manager"]
    displays = []
    for display in manager["Displays"]:
        if "Topic" not in display:
            displays.append(display)
            continue
        output = display["Topic"]["Value"].rpartition("/")[2]
        for camera in cameras:
            shown = copy.deepcopy(display)
            shown["Topic"]["Value"] = "/".join([node, camera, output] if camera else [node, output])
            shown["Name"] = f"{display['Name']} ({camera})" if camera else display["Name"]
            displays.append(shown)
    manager["Displays"] = displays
    manager["Global Options"]["Fixed Frame"] = fixed_frame
    return yaml.safe_dump(config, sort_keys=False)
