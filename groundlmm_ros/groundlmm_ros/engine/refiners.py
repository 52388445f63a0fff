"""Points (and heat maps) -> masks (docs/method.md, steps 7-8).

Every refiner: `set_images(images)` once per step with the frames of its queries, then
`refine(i, heatmaps, points)` with all phrases of frame i -> per phrase (mask (H, W) bool, score).
Images are (H, W, 3) uint8 RGB, heat maps (H, W) float32 and points (x, y) in the same pixels.
`warm_up(frames)` before the first query builds what a step of up to `frames` frames needs.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry

SAM_PROMPTS = ("point", "box")


class Refiner(Protocol):
    def warm_up(self, frames: int = 1) -> None: ...

    def set_images(self, images: list[np.ndarray]) -> None: ...

    def refine(
        self, image: int, heatmaps: list[np.ndarray], points: list[tuple[int, int]]
    ) -> list[tuple[np.ndarray, float]]: ...


@dataclass
class SamEmbedding:
    """One frame as SamPredictor holds it after set_image."""

    features: torch.Tensor  # (1, C, h, w) float32, the image encoder's output
    input_size: tuple[int, int]  # the frame resized so its long side is the encoder's input side
    original_size: tuple[int, int]  # (H, W) of the frame


class SamRefiner:
    """segment_anything's SamPredictor.

    prompt="point" (the paper's GCG setting): one positive point, multimask output, and
    the LAST of the three masks as the reference keeps it (not the best-scoring one).
    prompt="box" (the reference's `aas/instance_seg.py --sam-mode mask`), on its absolute
    scale: x = heat map / attention_temperature; the box around the pixels where
    x > box_threshold, plus logit(clip(x)) as SAM's low-resolution mask prompt; the last mask.
    score: SAM's predicted IoU of the kept mask.

    The frames of one step are embedded in one batched image-encoder call, and all phrases of
    one frame are decoded in one batched prompt call; each gets the mask it gets alone.

    encoder_dtype: the image encoder is most of SAM's time (ViT-H on an H200: 178 ms in
    float32, 48 ms under float16 autocast, 44 ms with its weights cast to bfloat16), so by
    default it runs under bfloat16 autocast on CUDA and in float32 elsewhere. Autocast rather
    than cast weights: its layer norms, softmax and residual sums stay float32, which keeps the
    masks of the tiny test SAM at IoU >= 0.98 against float32, where cast weights did not, and
    leaves the caller's Sam as it was. Its features, the prompts and the masks stay float32.
    compile: torch.compile the image encoder (its input is always one fixed square, so one
    graph per number of frames; warm_up builds them).
    """

    def __init__(
        self,
        sam,
        prompt: str = "point",
        attention_temperature: float = 2e-4,
        box_threshold: float = 0.75,
        encoder_dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        if prompt not in SAM_PROMPTS:
            raise ValueError(f"SAM prompt must be one of {SAM_PROMPTS}, got {prompt!r}")
        self.predictor = SamPredictor(sam)
        self.prompt = prompt
        # The reference's --attn-temp and --box-thresh.
        self.attention_temperature = attention_temperature
        self.box_threshold = box_threshold
        cuda = sam.device.type == "cuda"
        self.encoder_dtype = encoder_dtype or (torch.bfloat16 if cuda else torch.float32)
        self.compiled = compile
        self.encoder = (
            torch.compile(sam.image_encoder, dynamic=False) if compile else sam.image_encoder
        )
        # The frames of the last set_images and their embeddings: a frame that comes again is
        # not embedded again.
        self._frames: list[np.ndarray] = []
        self._embeddings: list[SamEmbedding] = []

    def warm_up(self, frames: int = 1) -> None:
        """Runs the image encoder once for each number of frames up to `frames`: a compiled
        encoder builds its graphs now, and CUDA loads its kernels, not on the first query.
        Uncompiled on the CPU there is nothing to build, so nothing runs."""
        if not self.compiled and self.predictor.device.type != "cuda":
            return
        side = self.predictor.model.image_encoder.img_size
        for count in range(1, frames + 1):
            self._embed([np.zeros((side, side, 3), np.uint8)] * count)

    def set_images(self, images: list[np.ndarray]) -> None:
        """Embeds the frames not held yet, in one batched call; holds exactly these frames."""
        held = [self._held(image) for image in images]
        missing = [image for image, embedding in zip(images, held) if embedding is None]
        embedded = iter(self._embed(missing) if missing else [])
        self._embeddings = [e if e is not None else next(embedded) for e in held]
        self._frames = [image.copy() for image in images]

    def _held(self, image: np.ndarray) -> SamEmbedding | None:
        for frame, embedding in zip(self._frames, self._embeddings):
            if frame.shape == image.shape and np.array_equal(frame, image):
                return embedding
        return None

    @torch.no_grad()
    def _embed(self, images: list[np.ndarray]) -> list[SamEmbedding]:
        """SamPredictor.set_image's steps for several frames, the encoder run once on all."""
        model, transform = self.predictor.model, self.predictor.transform
        inputs, sizes = [], []
        for image in images:
            resized = torch.as_tensor(transform.apply_image(image), device=model.device)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            inputs.append(model.preprocess(resized))
            sizes.append((tuple(resized.shape[-2:]), image.shape[:2]))
        batch = torch.cat(inputs)
        half = self.encoder_dtype != torch.float32
        with torch.autocast(model.device.type, dtype=self.encoder_dtype, enabled=half):
            features = self.encoder(batch).float()
        return [
            SamEmbedding(features[k : k + 1], input_size, original_size)
            for k, (input_size, original_size) in enumerate(sizes)
        ]

    def refine(self, image, heatmaps, points):
        """All phrases of frame `image` in one prompt call."""
        embedding, predictor = self._embeddings[image], self.predictor
        # The state SamPredictor.set_image leaves, for this frame.
        predictor.features = embedding.features
        predictor.input_size = embedding.input_size
        predictor.original_size = size = embedding.original_size
        predictor.is_image_set = True
        device = predictor.device
        coords = labels = boxes = mask_input = None
        if self.prompt == "point":
            # (P, 1, 2): one positive point per phrase, as predict() makes them.
            transformed = predictor.transform.apply_coords(np.array(points, float)[:, None], size)
            coords = torch.as_tensor(transformed, dtype=torch.float, device=device)
            labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
        else:
            scaled = [heat / self.attention_temperature for heat in heatmaps]
            transformed = predictor.transform.apply_boxes(
                np.stack([self.box_prompt(x) for x in scaled]), size
            )
            boxes = torch.as_tensor(transformed, dtype=torch.float, device=device)
            logits = np.stack([self.mask_prompt_logits(x) for x in scaled])
            mask_input = torch.as_tensor(logits, dtype=torch.float, device=device)
        masks, scores, _ = predictor.predict_torch(
            coords, labels, boxes, mask_input, multimask_output=True
        )
        masks, scores = masks[:, -1].cpu().numpy(), scores[:, -1].tolist()
        return list(zip(masks.astype(bool), scores))

    def box_prompt(self, scaled: np.ndarray) -> np.ndarray:
        """(4,) x0, y0, x1, y1 (exclusive) around the pixels where scaled > box_threshold; all
        zeros when there is none (the reference's convert_box_SAM)."""
        rows, columns = np.nonzero(scaled > self.box_threshold)
        if rows.size == 0:
            return np.zeros(4, np.float32)
        return np.array(
            [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=np.float32
        )

    def mask_prompt_logits(self, scaled: np.ndarray, eps: float = 1e-3) -> np.ndarray:
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

    def warm_up(self, frames: int = 1) -> None:
        """Nothing to build: the heat map alone decides."""

    def set_images(self, images: list[np.ndarray]) -> None:
        """Nothing to hold: the heat map alone decides."""

    def refine(self, image, heatmaps, points):
        return [(heat_region(h, p, self.fraction), 1.0) for h, p in zip(heatmaps, points)]


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
        self.images: list[np.ndarray] = []

    def warm_up(self, frames: int = 1) -> None:
        """Nothing to build: OpenCV only."""

    def set_images(self, images: list[np.ndarray]) -> None:
        # A 3x3 median removes sensor noise and JPEG speckle that would stop the fill
        # inside a uniform surface, while keeping edges sharp.
        self.images = [cv2.medianBlur(np.ascontiguousarray(image), 3) for image in images]

    def refine(self, image, heatmaps, points):
        if not 0 <= image < len(self.images):
            raise ValueError(
                f"ColourRefiner.refine: no frame {image}; set_images holds {len(self.images)}"
            )
        return [self._fill(self.images[image], h, p) for h, p in zip(heatmaps, points)]

    def _fill(self, image: np.ndarray, heatmap: np.ndarray, point: tuple[int, int]):
        if image.shape[:2] != heatmap.shape:
            raise ValueError(
                f"ColourRefiner.refine: heat map {heatmap.shape} is not the size of the frame, "
                f"{image.shape[:2]}"
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
            image,
            blocked,
            point,
            0,
            tolerance,
            tolerance,
            4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (2 << 8),
        )
        filled = blocked[1:-1, 1:-1] == 2
        if not self.min_fill <= filled.sum() / region.sum() <= self.max_fill:
            return heat_region(heatmap, point, self.fallback.fraction), 1.0
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
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # A truncated or corrupt file, or one that would run code when unpickled (weights_only
    # refuses it), fails deep in torch's loader, naming no file (and the unpickler's message is
    # pages about weights_only): the file and the error's type say it.
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(
            f"{checkpoint}: cannot be read as a SAM checkpoint (weights only): truncated, "
            f"corrupt or holding code ({type(error).__name__})"
        ) from error
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
