"""Grounded conversation generation (GCG) on GranDf, scored as GLaMM does.

Data (GLaMM's GranDf val/test annotations, read as the reference's aas/eval_gcg.py reads them):
- caption GT JSON: {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption",
  "labels": [phrase, ...]}]}: the images of the split and their ground-truth phrases;
- mask GT JSON: COCO instances, one annotation per phrase (category 1, RLE segmentation), in the
  order of that image's "labels";
- predictions, one JSON per image ({image_id}.json): {"image_id", "caption", "phrases",
  "pred_masks": [RLE, ...]}, the format of GLaMM's eval/gcg/infer.py and the reference's aas/gcg.py.

Metrics (GLaMM eval/gcg/evaluate.py; the reference's aas/eval_gcg.py is the same code):
- mask recall: per image, greedy one-to-one matching on the (GT x prediction) IoU matrix, best
  pair first; a pair is accepted when IoU >= 0.5 and the phrases' text similarity >= 0.5, and the
  first pair that fails either test ends that image's matching. recall = accepted pairs / GT labels
  over all images of the caption GT.
- mIoU: per image, greedy one-to-one matching on the (prediction x GT) IoU matrix while the best
  IoU is > 0, mean of the matched IoUs (0 for an image with no pair); mean over images.
- AP50 (and AP50:95): COCOeval "segm" on category 1 and the evaluated images, every predicted
  mask with score 1.
The caption metrics of those scripts (BLEU, METEOR, CIDEr via pycocoevalcap) are not computed here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from groundlmm_ros.engine.engine import GCG_QUESTION
from groundlmm_ros.engine.types import PAPER_ANSWER_TOKENS
from groundlmm_ros.evaluation import mask_iou
from groundlmm_ros.paper_eval.masks import encode_mask, load_json, read_image

IOU_THRESHOLD = 0.5
TEXT_SIMILARITY_THRESHOLD = 0.5


class PhraseSimilarity:
    """Cosine similarity of mean-pooled last hidden states of a local text encoder
    (GLaMM: bert-base-uncased, every token of the truncated input averaged, [CLS] and [SEP] too).
    Embeddings are cached per string: the reference re-embeds every pair, with the same result."""

    def __init__(self, directory: str, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(directory):
            raise ValueError(
                f"text model {directory!r} is not a directory (a bert-base-uncased folder)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).to(device).eval()
        self.device = device
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, text: str) -> np.ndarray:
        if text not in self.cache:
            inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True).to(
                self.device
            )
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state[0]
            self.cache[text] = hidden.mean(dim=0).float().cpu().numpy()
        return self.cache[text]

    def __call__(self, a: str, b: str) -> float:
        x, y = self.embed(a), self.embed(b)
        norms = float(np.linalg.norm(x) * np.linalg.norm(y))
        # sklearn's cosine_similarity gives 0 for a zero vector.
        return float(x @ y / norms) if norms else 0.0


def greedy_pairs(
    ious: np.ndarray, accept: Callable[[int, int, float], bool]
) -> list[tuple[int, int]]:
    """Best remaining pair first (np.argmax: the first in row-major order on ties), its row and
    column then zeroed; stops at the first pair that accept(row, column, remaining IoU) refuses."""
    ious = ious.astype(np.float64, copy=True)
    pairs = []
    while ious.size:
        i, j = np.unravel_index(int(np.argmax(ious)), ious.shape)
        if not accept(int(i), int(j), float(ious[i, j])):
            break
        pairs.append((int(i), int(j)))
        ious[i, :] = 0
        ious[:, j] = 0
    return pairs


def iou_matrix(rows: list[np.ndarray], columns: list[np.ndarray]) -> np.ndarray:
    ious = [[mask_iou(a, b) for b in columns] for a in rows]
    return np.array(ious, dtype=np.float64).reshape(len(rows), len(columns))  # (0, n) too


def image_miou(pred_masks: list[np.ndarray], gt_masks: list[np.ndarray]) -> float:
    """GLaMM's compute_miou: pairs while the best IoU is > 0 (a zeroed row never wins again)."""
    ious = iou_matrix(pred_masks, gt_masks)
    pairs = greedy_pairs(ious, lambda i, j, iou: iou > 0)
    return float(np.mean([ious[i, j] for i, j in pairs])) if pairs else 0.0


def image_matches(
    gt_masks, gt_labels, pred_masks, pred_labels, similarity
) -> list[tuple[int, int]]:
    """GLaMM's find_best_matches: (gt index, prediction index) pairs passing both thresholds."""
    ious = iou_matrix(gt_masks, pred_masks)
    return greedy_pairs(
        ious,
        lambda i, j, iou: (
            iou >= IOU_THRESHOLD
            and similarity(gt_labels[i], pred_labels[j]) >= TEXT_SIMILARITY_THRESHOLD
        ),
    )


@dataclass
class GcgImage:
    id: object  # GranDf ids are strings (the file name without .jpg)
    file_name: str
    height: int
    width: int
    labels: list[str]  # the GT phrases, in the order of the image's mask annotations


def quiet():
    """pycocotools prints progress to stdout, where the command's JSON goes."""
    return contextlib.redirect_stdout(sys.stderr)


def load_ground_truth(caption_path: str, mask_path: str) -> tuple[list[GcgImage], COCO]:
    captions = load_json(caption_path, ("images", "annotations"))
    load_json(mask_path, ("images", "annotations", "categories"))
    labels: dict = {}
    for annotation in captions["annotations"]:
        if "labels" not in annotation:
            raise ValueError(
                f"{caption_path}: caption annotation {annotation.get('id')} has no 'labels'"
            )
        # The first one, as GLaMM's [0].
        labels.setdefault(annotation["image_id"], annotation["labels"])
    with quiet():
        coco = COCO(mask_path)
    images = []
    for entry in captions["images"]:
        if entry["id"] not in labels:
            raise ValueError(f"{caption_path}: image {entry['id']!r} has no caption annotation")
        if entry["id"] not in coco.imgs:
            raise ValueError(f"{mask_path}: image {entry['id']!r} of {caption_path} is missing")
        size = coco.imgs[entry["id"]]
        image = GcgImage(
            entry["id"],
            entry.get("file_name", f"{entry['id']}.jpg"),
            size["height"],
            size["width"],
            list(labels[entry["id"]]),
        )
        n_masks = len(coco.getAnnIds(imgIds=[image.id]))
        if n_masks != len(image.labels):
            raise ValueError(
                f"image {image.id!r}: {len(image.labels)} GT labels but {n_masks} GT masks"
            )
        images.append(image)
    return images, coco


def gt_masks(coco: COCO, image: GcgImage) -> list[np.ndarray]:
    """The image's GT masks in file order (GLaMM scans coco.anns in order; imgToAnns keeps it)."""
    return [
        coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image.id]))
    ]


def pred_masks(prediction: dict, image: GcgImage) -> list[np.ndarray]:
    masks = [mask_utils.decode(rle).astype(bool) for rle in prediction["pred_masks"]]
    for mask in masks:
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"image {image.id!r}: a predicted mask is {mask.shape[0]}x{mask.shape[1]}, "
                f"the image {image.height}x{image.width}"
            )
    return masks


def average_precision(coco: COCO, images: list[GcgImage], predictions: dict) -> tuple[float, float]:
    """(AP50, AP50:95) of COCOeval "segm", category 1, every predicted mask scored 1."""
    detections = [
        {"image_id": image.id, "category_id": 1, "segmentation": copy.deepcopy(rle), "score": 1.0}
        for image in images
        for rle in predictions[image.id]["pred_masks"]
    ]
    if not detections:  # loadRes cannot take an empty list; no detection is AP 0
        return 0.0, 0.0
    with quiet():
        evaluation = COCOeval(coco, coco.loadRes(detections), "segm")
        evaluation.params.catIds = [1]
        # GLaMM: all of the split's, the same set.
        evaluation.params.imgIds = [image.id for image in images]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval gives -1 where there is no GT at all.
    return max(float(evaluation.stats[1]), 0.0), max(float(evaluation.stats[0]), 0.0)


def score(coco: COCO, images: list[GcgImage], predictions: dict, similarity) -> dict:
    """The GCG metrics of `predictions` ({image id: prediction record}) on `images`."""
    matched, gt_total, mious = 0, 0, []
    for image in images:
        prediction = predictions[image.id]
        if len(prediction["phrases"]) != len(prediction["pred_masks"]):
            raise ValueError(
                f"image {image.id!r}: {len(prediction['phrases'])} phrases but "
                f"{len(prediction['pred_masks'])} masks in the prediction"
            )
        gt, pred = gt_masks(coco, image), pred_masks(prediction, image)
        mious.append(image_miou(pred, gt))
        matched += len(image_matches(gt, image.labels, pred, prediction["phrases"], similarity))
        gt_total += len(image.labels)
    ap50, ap = average_precision(coco, images, predictions)
    return {
        "images": len(images),
        "gt_phrases": gt_total,
        "predicted_phrases": sum(len(predictions[i.id]["phrases"]) for i in images),
        "mask_recall": matched / gt_total if gt_total else 0.0,
        "miou": float(np.mean(mious)) if mious else 0.0,
        "ap50": ap50,
        "ap50_95": ap,
    }


def predict(
    engine,
    image: np.ndarray,
    image_id,
    question: str = GCG_QUESTION,
    max_new_tokens: int = PAPER_ANSWER_TOKENS,
) -> dict:
    """One image described and grounded by the engine, as a prediction record."""
    grounding = engine.ground(image, question, mode="describe", max_new_tokens=max_new_tokens)
    return {
        "image_id": image_id,
        "caption": grounding.answer,
        "phrases": [p.text for p in grounding.phrases],
        "pred_masks": [encode_mask(p.mask) for p in grounding.phrases],
    }


def prediction_path(folder: str, image_id) -> str:
    return os.path.join(folder, f"{image_id}.json")


def read_prediction(folder: str, image_id) -> dict:
    """A GLaMM/reference prediction file; GLaMM also accepts the record nested under one key."""
    path = prediction_path(folder, image_id)
    record = load_json(path, ())
    if (
        "caption" not in record
        and len(record) == 1
        and isinstance(next(iter(record.values())), dict)
    ):
        record = next(iter(record.values()))
    missing = [key for key in ("phrases", "pred_masks") if key not in record]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return record


def run(
    engine,
    images: list[GcgImage],
    image_folder: str,
    *,
    question: str = GCG_QUESTION,
    max_new_tokens: int = PAPER_ANSWER_TOKENS,
    prediction_folder: str | None = None,
    progress=None,
) -> dict:
    """Describe and ground every image; the prediction records by image id (also written to
    prediction_folder as {image_id}.json when given)."""
    if prediction_folder:
        os.makedirs(prediction_folder, exist_ok=True)
    predictions = {}
    for k, image in enumerate(images):
        rgb = read_image(image_folder, image.file_name, (image.height, image.width))
        predictions[image.id] = predict(engine, rgb, image.id, question, max_new_tokens)
        if prediction_folder:
            with open(prediction_path(prediction_folder, image.id), "w") as f:
                json.dump(predictions[image.id], f)
        if progress is not None:
            progress(
                k + 1, len(images), image.id, f"{len(predictions[image.id]['phrases'])} phrases"
            )
    return predictions
