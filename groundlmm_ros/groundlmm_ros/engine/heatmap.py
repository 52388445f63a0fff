"""Token maps -> phrase heat maps in image pixels -> point prompts (docs/method.md, steps 3, 5, 6).

Maps are torch tensors on the grid of visual tokens: (T, h, w) per answer token; heat maps are
(H, W) float32 tensors in input-image pixels. Everything runs on the maps' device (the model's):
only the point, two integers, has to come back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

COMBINE = ("mean", "max", "first")
# The reference's GCG script takes the element-wise max of a phrase's root-token maps
# (groundLMM aas/gcg.py --group-aggregation, default max; aas/gcg.sh passes max); its first
# commit averaged them ("mean").
DEFAULT_COMBINE = "max"
UPSAMPLE = ("pad", "resize")


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """(T, h, w) -> (T, h, w) minus the answer's mean map: removes the attention sinks
    every token shares. Nothing else (no softmax, no min-max)."""
    return maps - maps.mean(dim=0, keepdim=True)


def combine(
    maps: torch.Tensor, token_indices: Sequence[int], how: str = DEFAULT_COMBINE
) -> torch.Tensor:
    """(T, h, w) -> (h, w): the maps of one phrase's tokens, element-wise mean, max or the first."""
    if how not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {how!r}")
    if not token_indices:
        raise ValueError("a phrase needs at least one token")
    chosen = maps[list(token_indices)]
    if how == "max":
        return chosen.amax(dim=0)
    if how == "mean":
        return chosen.mean(dim=0)
    return chosen[0]


def upsample(
    grid_maps: torch.Tensor, image_size: tuple[int, int], mode: str = "pad"
) -> torch.Tensor:
    """(P, h, w) grid maps -> (P, H, W) float32 image-pixel heat maps on their device, bicubic
    (align_corners=False).

    "pad": the model saw the image centred in a max(H, W) square, so upsample to that
    square and crop the centre (the crop starts where pad_to_square put the image).
    "resize": the model saw the image stretched to a square; resize straight to H x W."""
    if mode not in UPSAMPLE:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE}, got {mode!r}")
    height, width = image_size
    # (1, P, h, w): interpolate wants a batch axis.
    maps = grid_maps.float().unsqueeze(0)
    if mode == "resize":
        return F.interpolate(maps, size=(height, width), mode="bicubic", align_corners=False)[0]
    side = max(height, width)
    square = F.interpolate(maps, size=(side, side), mode="bicubic", align_corners=False)[0]
    top, left = (side - height) // 2, (side - width) // 2
    return square[:, top : top + height, left : left + width].contiguous()


def argmax_point(heatmap: torch.Tensor) -> tuple[int, int]:
    """(H, W) -> (x, y) pixel of the maximum (the first one in row-major order on ties)."""
    row, column = divmod(int(heatmap.flatten().argmax()), heatmap.shape[1])
    return column, row
