"""Grounding evaluation on held-out synthetic scenes (world/), in both engine modes.

- refer: for every object, ground its referring expression ("the red circle");
  pointing accuracy = the heat-map argmax falls inside that object's mask; mIoU = mean
  IoU of the returned mask with the object's mask.
- describe: ground the model's own caption; greedy one-to-one matching of predicted to
  ground-truth masks by IoU (as in GLaMM's GCG evaluation); a pair counts for mask recall
  when IoU >= 0.5 AND the phrase names the object (its colour and shape words; GLaMM
  uses a BERT similarity, here the vocabulary is closed so exact words are the fair test);
  recall = counted pairs / ground-truth objects; mIoU = mean over objects of the matched
  IoU (0 when unmatched).
- baselines on the refer queries: a uniformly random point (its exact expected hit rate,
  the mask's area fraction) and the image centre.
"""

from __future__ import annotations

import numpy as np

from groundlmm_ros.engine.types import Grounding
from groundlmm_ros.world import Scene, SceneObject, make_scenes, referring_expression

EVAL_SEED = 20_000  # the held-out stream; training draws its scenes from other seeds
IOU_THRESHOLD = 0.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def point_in_mask(point: tuple[int, int], mask: np.ndarray) -> bool:
    """point is (x, y) in pixels of the mask's (H, W) frame."""
    x, y = point
    return bool(0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x])


def phrase_names(text: str, obj: SceneObject) -> bool:
    """True when the phrase says the object's colour and shape."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return obj.colour in words and obj.shape in words


def match_describe(
    grounding: Grounding, objects: list[SceneObject]
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of predicted phrases to objects by mask IoU, best pair
    first; returns (phrase index, object index, IoU) for pairs with IoU > 0."""
    ious = np.array([[mask_iou(p.mask, o.mask) for o in objects] for p in grounding.phrases])
    pairs = []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(int(ious.argmax()), ious.shape)
        pairs.append((int(i), int(j), float(ious[i, j])))
        ious[i, :] = 0
        ious[:, j] = 0
    return pairs


def score_describe(grounding: Grounding, scene: Scene) -> tuple[int, float]:
    """(objects recalled, sum of matched IoUs) for one described scene."""
    recalled, iou_sum = 0, 0.0
    for i, j, iou in match_describe(grounding, scene.objects):
        iou_sum += iou
        if iou >= IOU_THRESHOLD and phrase_names(grounding.phrases[i].text, scene.objects[j]):
            recalled += 1
    return recalled, iou_sum


def score_refer(grounding: Grounding, obj: SceneObject) -> tuple[bool, float]:
    """(pointing hit, mask IoU) of a refer-mode result for its target object."""
    if len(grounding.phrases) != 1:
        raise ValueError(f"refer mode must return exactly one phrase, got {len(grounding.phrases)}")
    phrase = grounding.phrases[0]
    return point_in_mask(phrase.point, obj.mask), mask_iou(phrase.mask, obj.mask)


def evaluate(engine, scenes: list[Scene], question: str, progress=None) -> dict:
    """Run the engine on every scene in both modes; returns the metrics (fractions in [0, 1])."""
    hits, refer_ious, random_hits, centre_hits = [], [], [], []
    recalled, describe_iou_sum, objects_total = 0, 0.0, 0
    for k, scene in enumerate(scenes):
        h, w = scene.image.shape[:2]
        for obj in scene.objects:
            hit, iou = score_refer(
                engine.ground(scene.image, referring_expression(obj), mode="refer"), obj
            )
            hits.append(hit)
            refer_ious.append(iou)
            random_hits.append(obj.mask.mean())  # expected hit rate of a uniform random point
            centre_hits.append(point_in_mask((w // 2, h // 2), obj.mask))
        n, iou_sum = score_describe(engine.ground(scene.image, question, mode="describe"), scene)
        recalled += n
        describe_iou_sum += iou_sum
        objects_total += len(scene.objects)
        if progress is not None:
            progress(k + 1, len(scenes))
    return {
        "scenes": len(scenes),
        "refer_queries": len(hits),
        "refer_pointing_accuracy": float(np.mean(hits)),
        "refer_miou": float(np.mean(refer_ious)),
        "describe_mask_recall": recalled / objects_total,
        "describe_miou": describe_iou_sum / objects_total,
        "random_pointing_accuracy": float(np.mean(random_hits)),
        "center_pointing_accuracy": float(np.mean(centre_hits)),
    }


def held_out_scenes(count: int, size: int = 128) -> list[Scene]:
    """The evaluation scenes: the first `count` of one fixed held-out stream."""
    if count < 1:
        raise ValueError(f"need at least one scene, got {count}")
    return make_scenes(count, seed=EVAL_SEED, size=size)


def format_table(metrics: dict) -> str:
    """A markdown table of the metrics, the form used in model/MODEL_CARD.md."""
    rows = [
        ("refer pointing accuracy", metrics["refer_pointing_accuracy"]),
        ("refer mIoU", metrics["refer_miou"]),
        ("describe mask recall", metrics["describe_mask_recall"]),
        ("describe mIoU", metrics["describe_miou"]),
        ("baseline: random point, pointing accuracy", metrics["random_pointing_accuracy"]),
        ("baseline: image centre, pointing accuracy", metrics["center_pointing_accuracy"]),
    ]
    lines = [
        f"| metric ({metrics['scenes']} held-out scenes, "
        f"{metrics['refer_queries']} refer queries) | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    return "\n".join(lines)
