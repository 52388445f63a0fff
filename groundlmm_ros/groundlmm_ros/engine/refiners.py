"""Point (and heat map) -> mask (docs/method.md, steps 7-8).

Every refiner: `set_image(image)` once per query, then `refine(heatmap, point)`
per phrase -> (mask (H, W) bool, score). Images are (H, W, 3) uint8 RGB,
heat maps (H, W) float32 and points (x, y) in the same pixels.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry

SAM_PROMPTS = ("point", "box")


class Refiner(Protocol):
    def set_image(self, image: np.ndarray) -> None: ...

    def refine(self, heatmap: np.ndarray, point: tuple[int, int]) -> tuple[np.ndarray, float]: ...


class SamRefiner:
    """segment_anything's SamPredictor.

    prompt="point" (the paper's GCG setting): one positive point, multimask output, and
    the LAST of the three masks as the reference keeps it (not the best-scoring one).
    prompt="box" (the reference's `aas/instance_seg.py --sam-mode mask`), on its absolute
    scale: x = heat map / attention_temperature; the box around the pixels where
    x > box_threshold, plus logit(clip(x)) as SAM's low-resolution mask prompt; the last mask.
    score: SAM's predicted IoU of the kept mask.
    """

    def __init__(
        self,
        sam,
        prompt: str = "point",
        attention_temperature: float = 2e-4,
        box_threshold: float = 0.75,
        encoder_dtype: torch.dtype | None = None,
    ):
        if prompt not in SAM_PROMPTS:
            raise ValueError(f"SAM prompt must be one of {SAM_PROMPTS}, got {prompt!r}")
        self.predictor = SamPredictor(sam)
        self.prompt = prompt
        self.attention_temperature = attention_temperature  # the reference's --attn-temp
        self.box_threshold = box_threshold  # the reference's --box-thresh
        # The image encoder is most of SAM's time (ViT-H: ~190 ms in float32 on an H200): by default
        # it runs in float16 on CUDA (autocast), float32 elsewhere; prompts and masks stay float32.
        # On CUDA it also runs on its own stream, so it overlaps whatever the caller runs next
        # (the engine embeds the frame first, then runs the LMM); refine() waits for it.
        device = sam.device
        self.encoder_dtype = encoder_dtype or (
            torch.float16 if device.type == "cuda" else torch.float32
        )
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._image: np.ndarray | None = None  # the frame whose embedding the predictor holds

    def set_image(self, image: np.ndarray) -> None:
        """Embeds the image once: queries on the same frame reuse the embedding."""
        if (
            self._image is not None
            and self._image.shape == image.shape
            and np.array_equal(self._image, image)
        ):
            return
        stream = nullcontext()
        if self._stream is not None:
            self._stream.wait_stream(
                torch.cuda.current_stream()
            )  # the old embedding is no longer in use
            stream = torch.cuda.stream(self._stream)
        with (
            stream,
            torch.autocast(
                self.predictor.device.type,
                dtype=self.encoder_dtype,
                enabled=self.encoder_dtype != torch.float32,
            ),
        ):
            self.predictor.set_image(image, image_format="RGB")
            self.predictor.features = self.predictor.features.float()
        self._image = image.copy()

    def _embedded(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    def refine(self, heatmap, point):
        self._embedded()
        if self.prompt == "point":
            masks, scores, _ = self.predictor.predict(
                point_coords=np.array([point], dtype=np.float32),
                point_labels=np.array([1]),
                multimask_output=True,
            )
        else:
            scaled = heatmap / self.attention_temperature
            masks, scores, _ = self.predictor.predict(
                box=self._box(scaled), mask_input=self._mask_logits(scaled), multimask_output=True
            )
        return masks[-1].astype(bool), float(scores[-1])

    def _box(self, scaled: np.ndarray) -> np.ndarray:
        """(4,) x0, y0, x1, y1 (exclusive) around the pixels where scaled > box_threshold; all
        zeros when there is none (the reference's convert_box_SAM)."""
        rows, columns = np.nonzero(scaled > self.box_threshold)
        if rows.size == 0:
            return np.zeros(4, np.float32)
        return np.array(
            [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=np.float32
        )

    def _mask_logits(self, scaled: np.ndarray, eps: float = 1e-3) -> np.ndarray:
        """(1, m, m) logits in SAM's low-resolution mask frame, the reference's convert_mask_SAM:
        logit(clip(scaled, eps, 1 - eps)), resized bicubic (align_corners=False) so the long
        side is m and the short side int(short / long * m), zero-padded right/bottom. m is the
        prompt encoder's mask size (256 for every released SAM, which the reference hard-codes)."""
        side = self.predictor.model.prompt_encoder.mask_input_size[0]
        height, width = scaled.shape
        probabilities = np.clip(scaled, eps, 1 - eps)
        logits = torch.from_numpy(np.log(probabilities / (1 - probabilities))).float()[None, None]
        size = (
            (side, int(width / height * side))
            if height >= width
            else (int(height / width * side), side)
        )
        resized = F.interpolate(logits, size, mode="bicubic", align_corners=False)[0, 0]
        padded = np.zeros((side, side), np.float32)
        padded[: size[0], : size[1]] = resized.numpy()
        return padded[None]


class ThresholdRefiner:
    """Weight-free fallback when no SAM checkpoint is configured: the connected region
    of the heat map above `fraction` of its range that contains the point.

    Why not GrabCut seeded at the point: GrabCut needs a box or a seeded region to
    learn its colour models; from one point it often takes the whole image or a few
    pixels, and it costs 0.1-0.5 s per phrase on CPU. The thresholded map is what the
    model itself attended to, always contains the point, is deterministic and takes ~1 ms.
    score: 1.0 (no quality estimate, as GroundedPhrase documents).
    """

    def __init__(self, fraction: float = 0.5):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"threshold fraction must be in (0, 1), got {fraction}")
        self.fraction = fraction

    def set_image(self, image: np.ndarray) -> None:
        pass  # the heat map alone decides

    def refine(self, heatmap, point):
        return heat_region(heatmap, point, self.fraction), 1.0


class ColourRefiner:
    """Weight-free fallback that follows the image: the pixels reachable from the point
    through colours within `tolerance` of the point's own (OpenCV's fixed-range flood
    fill), kept inside the heat map's region around the point (above `fraction` of its
    range, widened by `margin` of the image side on every side, since the map is coarser than the
    object's edges). When the fill is degenerate (under `min_fill` of that region: the
    point fell on a speck; or over `max_fill`: no colour edge inside, e.g. the point is
    on the background), the region of the map itself (ThresholdRefiner) is returned.

    It is what SAM does from a point prompt, for objects of one colour; textured objects
    fall back to the map. ~2-3 ms per phrase at 640 x 480. score: 1.0 (no quality estimate).
    """

    def __init__(
        self,
        tolerance: int = 32,
        fraction: float = 0.3,
        margin: float = 0.06,
        min_fill: float = 0.02,
        max_fill: float = 0.9,
        fallback: ThresholdRefiner = ThresholdRefiner(),
    ):
        if not 0 < tolerance < 256:
            raise ValueError(f"colour tolerance must be in 1..255, got {tolerance}")
        if (
            not 0.0 < fraction < 1.0
            or not 0.0 <= margin < 1.0
            or not 0.0 <= min_fill < max_fill <= 1.0
        ):
            raise ValueError(
                f"need 0 < fraction < 1, 0 <= margin < 1, 0 <= min_fill < max_fill <= 1; got "
                f"{fraction}, {margin}, {min_fill}, {max_fill}"
            )
        self.tolerance, self.fraction, self.margin = tolerance, fraction, margin
        self.min_fill, self.max_fill = min_fill, max_fill
        self.fallback = fallback
        self.image = None

    def set_image(self, image: np.ndarray) -> None:
        # A 3x3 median removes sensor noise and JPEG speckle that would stop the fill
        # inside a uniform surface, while keeping edges sharp.
        self.image = cv2.medianBlur(np.ascontiguousarray(image), 3)

    def refine(self, heatmap, point):
        if self.image is None or self.image.shape[:2] != heatmap.shape:
            raise ValueError(
                "ColourRefiner.refine needs set_image with an image of the heat map's size first"
            )
        height, width = heatmap.shape
        side = 2 * round(self.margin * max(height, width)) + 1
        # A square margin: OpenCV dilates by a rectangle separably (~0.5 ms at 640 x 480;
        # an ellipse of the same size takes ~20 ms).
        region = cv2.dilate(
            heat_region(heatmap, point, self.fraction).astype(np.uint8),
            np.ones((side, side), np.uint8),
        )
        # floodFill's mask is 2 px larger than the image; non-zero pixels stop the fill,
        # and filled pixels are marked 2 (flags bits 8-15), so the region outside stays 1.
        blocked = np.ones((height + 2, width + 2), np.uint8)
        blocked[1:-1, 1:-1] -= region
        tolerance = (self.tolerance,) * 3
        cv2.floodFill(
            self.image,
            blocked,
            point,
            0,
            tolerance,
            tolerance,
            4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (2 << 8),
        )
        filled = blocked[1:-1, 1:-1] == 2
        if not self.min_fill <= filled.sum() / region.sum() <= self.max_fill:
            return self.fallback.refine(heatmap, point)
        return filled, 1.0


def heat_region(heatmap: np.ndarray, point: tuple[int, int], fraction: float) -> np.ndarray:
    """(H, W) bool: the 8-connected region of the heat map above `fraction` of its range
    that contains the point (x, y)."""
    low, high = float(heatmap.min()), float(heatmap.max())
    above = (heatmap >= low + fraction * (high - low)).astype(np.uint8)
    _, labels = cv2.connectedComponents(above, connectivity=8)
    x, y = point
    return labels == labels[y, x]


def load_sam(checkpoint: str, device: str = "cpu"):
    """A segment_anything checkpoint (sam_vit_{h,l,b}_*.pth), loaded with weights_only=True
    (the library's own builder unpickles without it). The variant comes from the
    encoder width stored in the file."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    widths = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state or state[key].shape[0] not in widths:
        raise ValueError(f"{checkpoint}: not a SAM ViT-H/L/B checkpoint (missing or odd {key})")
    sam = sam_model_registry[widths[state[key].shape[0]]]()
    sam.load_state_dict(state)
    return sam.to(device).eval()


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """(P, H, W) bool -> (P, P) pairwise IoU."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    intersection = flat @ flat.T
    area = flat.sum(axis=1)
    return intersection / np.maximum(area[:, None] + area[None, :] - intersection, 1e-6)


def nms_keep(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices (in input order) of masks kept by greedy NMS: highest score first, a mask
    overlapping a kept one by IoU > iou_threshold is dropped (the reference demo's merge)."""
    iou = mask_iou(masks)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        if all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(int(i))
    return sorted(kept)
