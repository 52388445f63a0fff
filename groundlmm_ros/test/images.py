"""Test images: random RGB frames, the same for the same seed in every test."""

import numpy as np


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB noise."""
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
