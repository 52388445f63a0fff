"""Synthetic scenes, captions and ground-truth masks for the demo model (numpy + OpenCV)."""

from groundlmm_ros.world.scenes import (
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    make_scene,
    make_scenes,
    referring_expression,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "make_scene",
    "make_scenes",
    "referring_expression",
]
