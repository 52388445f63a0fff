"""Could preprocessing run on the GPU? A torch antialiased bicubic resize against the PIL one.

    python bench/preprocess_fidelity.py

LLaVA-style checkpoints were trained on pixels that PIL resized (bicubic, after pad-to-square,
to 8-bit values): models/llava_prompts.py to_pixel_values repeats that. The torch candidate is
F.interpolate(mode="bicubic", antialias=True, align_corners=False) on the padded frame as float,
which runs on the GPU. For each image set and model input side it prints the largest
difference from PIL's pixels in units of 1/255, for torch's float output and for it rounded to
8 bits, and the share of pixels more than 1/255 apart. Then, on the tiny random LLaVA and
DiffLMM, the largest difference of a refer answer's maps (beside their largest value) and in
how many images its point moves.

Image sets: "camera", 640x480 frames of the world/ scenes drawn at 640 px with sensor noise
(sigma 3) and a JPEG round trip at quality 90, as a camera driver would deliver them; "world",
the world/ scenes at their own 128 px; "noise", uniform random pixels (the worst case, no
camera gives it). The last line is JSON with every figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# The package, uninstalled.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "groundlmm_ros"))

from groundlmm_ros.engine import heatmap  # noqa: E402
from groundlmm_ros.models.llava_prompts import (  # noqa: E402
    CLIP_PREPROCESSING,
    pad_to_square,
    to_pixel_values,
)
from groundlmm_ros.models.presets import build_engine  # noqa: E402
from groundlmm_ros.world import make_scenes  # noqa: E402

# The input sides of LLaVA-1.5 (CLIP ViT-L/14-336) and DiffLMM (its UNet branch).
SIDES = (336, 384)
EXPRESSION = "the red circle"


def camera_frames(count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    frames = []
    for scene in make_scenes(count, seed=5, size=640):
        noisy = scene.image[:480].astype(np.float32) + rng.normal(0, 3, (480, 640, 3))
        frame = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        _, jpeg = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        frames.append(np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]))
    return frames


def image_sets() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    return {
        "camera": camera_frames(),
        "world": [scene.image for scene in make_scenes(16, seed=7)],
        "noise": [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(4)],
    }


def torch_resize(image: np.ndarray, side: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (side, side, 3) float in 0..255, torch's antialiased bicubic."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(
        pixels, size=(side, side), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0)


def pil_resize(image: np.ndarray, side: int) -> torch.Tensor:
    """What to_pixel_values feeds the model, back in 0..255 (its 8-bit PIL resize)."""
    mean = torch.tensor(CLIP_PREPROCESSING.mean)
    std = torch.tensor(CLIP_PREPROCESSING.std)
    pixels = to_pixel_values(image, side, CLIP_PREPROCESSING.mean, CLIP_PREPROCESSING.std)[0]
    return (pixels.permute(1, 2, 0) * std + mean) * 255


def pixel_figures(images: list[np.ndarray], side: int) -> dict[str, float]:
    largest = largest_rounded = over = total = 0.0
    for image in images:
        padded = pad_to_square(image, CLIP_PREPROCESSING.pad_color)
        reference = pil_resize(padded, side).round()
        candidate = torch_resize(padded, side)
        difference = (candidate - reference).abs()
        largest = max(largest, float(difference.max()))
        largest_rounded = max(
            largest_rounded, float((candidate.round().clamp(0, 255) - reference).abs().max())
        )
        over += float((difference > 1).sum())
        total += difference.numel()
    return {
        "max_diff_255": round(largest, 3),
        "max_diff_rounded_255": round(largest_rounded, 3),
        "share_over_1_255": round(over / total, 6),
    }


def map_figures(preset: str, images: list[np.ndarray]) -> dict[str, float]:
    """A refer answer's maps from PIL's pixels and from torch's, on a tiny random model."""
    engine = build_engine(preset, refiner="threshold", seed=0)
    backend = engine.backend
    ids = backend.encode_text(EXPRESSION)
    largest, scale, moved = 0.0, 0.0, 0
    for image in images:
        padded = pad_to_square(image, backend.prompts.preprocessing.pad_color)
        side = backend.prompts.image_size
        mean = torch.tensor(backend.prompts.preprocessing.mean)
        std = torch.tensor(backend.prompts.preprocessing.std)
        candidate = ((torch_resize(padded, side) / 255 - mean) / std).permute(2, 0, 1)[None]
        maps = []
        for pixels in (backend.prompts.preprocess(image), candidate.to(backend.prompts.device)):
            torch.manual_seed(0)
            visual = backend.prompts.encoder.encode_image(pixels)[0]
            maps.append(backend.teacher_force(visual, engine.refer_question, ids).float())
        largest = max(largest, float((maps[0] - maps[1]).abs().max()))
        scale = max(scale, float(maps[0].abs().max()))
        points = [
            heatmap.argmax_point(
                heatmap.upsample(
                    engine.token_maps(m, backend.prompts.grid)[-1:],
                    image.shape[:2],
                    engine.upsample,
                )[0]
            )
            for m in maps
        ]
        moved += points[0] != points[1]
    return {
        "maps_max_abs_diff": largest,
        "maps_max_abs": scale,
        "points_moved": moved,
        "images": len(images),
    }


def main() -> None:
    sets = image_sets()
    result = {"pixels": {}, "maps": {}}
    for name, images in sets.items():
        for side in SIDES:
            figures = pixel_figures(images, side)
            result["pixels"][f"{name}_{side}"] = figures
            print(f"{name:7s} -> {side}: {figures}")
    for preset in ("tiny-random", "tiny-difflmm-random"):
        for name in ("camera", "world"):
            figures = map_figures(preset, sets[name])
            result["maps"][f"{preset}_{name}"] = figures
            print(f"{preset} {name}: {figures}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
