"""Synthetic scenes, captions and ground-truth masks for the demo model (numpy + OpenCV)."""
from .scenes import COLOURS, SHAPES, Scene, SceneObject, make_scene, make_scenes, referring_expression

__all__ = ["COLOURS", "SHAPES", "Scene", "SceneObject", "make_scene", "make_scenes", "referring_expression"]
