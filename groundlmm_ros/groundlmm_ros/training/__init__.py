"""Training of the shipped demo model (see train.py for the recipe)."""

from groundlmm_ros.training.train import Budget, train

__all__ = ["Budget", "train"]
