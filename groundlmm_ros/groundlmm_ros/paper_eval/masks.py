"""COCO-style masks through pycocotools (RLE encode/decode), and the file reading both
evaluations share: JSON annotation files and images, checked with clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> compressed RLE with a str "counts" (JSON-ready), as GLaMM and the
    reference (groundLMM aas/utils.py encode_segm) write predictions."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO "segmentation" (polygons, uncompressed RLE or compressed RLE) -> (H, W) bool,
    the three cases of the reference's decode_segm (groundLMM aas/utils.py)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = segmentation
    else:
        raise ValueError(f"not a COCO segmentation (polygons or RLE): {str(segmentation)[:80]}")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(
            f"segmentation is {mask.shape[0]}x{mask.shape[1]}, its image is {height}x{width}"
        )
    return mask


def load_json(path: str, required: tuple[str, ...]) -> dict:
    """A JSON object file with the given top-level keys, or a ValueError naming what is wrong."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path}: missing top-level key(s) {missing}")
    return data


def read_image(folder: str, file_name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of folder/file_name; size (H, W) is what the annotations say it is."""
    path = os.path.join(folder, file_name)
    if not os.path.isfile(path):
        raise ValueError(f"image {path} does not exist")
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    if size is not None and rgb.shape[:2] != tuple(size):
        raise ValueError(
            f"image {path} is {rgb.shape[0]}x{rgb.shape[1]}, "
            f"its annotations say {size[0]}x{size[1]}"
        )
    return rgb


def check_images(folder: str, file_names) -> None:
    """Every image is there, before hours of model time are spent on the ones before it."""
    missing = sorted(
        {name for name in file_names if not os.path.isfile(os.path.join(folder, name))}
    )
    if missing:
        raise ValueError(f"{len(missing)} image(s) missing in {folder}, e.g. {missing[0]}")
