"""Training of the shipped demo model (see train.py for the recipe)."""
from .train import Budget, train

__all__ = ["Budget", "train"]
