"""Referring expression segmentation (RES) on RefCOCO / RefCOCO+ / RefCOCOg.

Data: the `refer` format (lichengunc/refer; the reference's aas/refcoco_refer.py): a refs pickle
(refs(unc).p, refs(umd).p for RefCOCOg): a list of {"ref_id", "ann_id", "image_id", "split",
"sentences": [{"sent_id", "sent"}, ...]}, plus instances.json (COCO images and annotations with
polygon or RLE segmentations) and the COCO train2014 images.

Every sentence of every ref of the split is one sample (the reference's aas/infer_attn_res.py).
Two ways to ground it:
- "recipe": the reference's RES recipe: generate an answer to the template (default
  'Describe the "{}" in the image.', the reference's default; its final runs in
  aas/infer_attn_res.sh used 'Describe the "{}".'), take the maps of the first 8 generated tokens
  (mean-map subtracted) combined by max, and refine their argmax point (ground_answer_span).
  aas/res.py then keeps the best-scoring proposal mask of an instance segmenter (Co-DETR)
  containing the point; here the engine's refiner (SAM with a point prompt) makes the mask.
- "refer": the project's refer mode (Engine.ground(..., mode="refer")).
Metrics (aas/res.py): cIoU = sum of intersections / sum of unions over all samples;
gIoU = mean of per-sample IoUs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass

import numpy as np

from groundlmm_ros.engine import heatmap
from groundlmm_ros.engine.engine import mask_bbox
from groundlmm_ros.engine.types import PAPER_ANSWER_TOKENS, GroundedPhrase, Grounding, InputError
from groundlmm_ros.paper_eval.masks import decode_segmentation, encode_mask, load_json, read_image

RES_TEMPLATE = 'Describe the "{}" in the image.'
RES_TOKENS = 8
MODES = ("recipe", "refer")


@dataclass
class RefSample:
    ref_id: int
    sent_id: int
    sentence: str
    image_id: int
    file_name: str
    height: int
    width: int
    segmentation: object  # the instance's COCO segmentation


class _PlainUnpickler(pickle.Unpickler):
    """The refs pickle holds only lists, dicts, strings and numbers, which need no class
    lookup: refusing every class makes loading it safe (pickle would run any callable)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refs pickle refers to {module}.{name}; only plain data is accepted"
        )


def load_refs(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            refs = _PlainUnpickler(io.BytesIO(f.read())).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: not a refs pickle ({error})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: a refs pickle is a list of dicts")
    return refs


def load_samples(refs_path: str, instances_path: str, split: str) -> list[RefSample]:
    """Every sentence of the split's refs, with its image and target instance."""
    instances = load_json(instances_path, ("images", "annotations"))
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    refs = [ref for ref in load_refs(refs_path) if ref.get("split") == split]
    if not refs:
        raise ValueError(f"{refs_path}: no refs in split {split!r}")
    samples = []
    for ref in refs:
        annotation = annotations.get(ref["ann_id"])
        if (
            annotation is None
            or annotation["image_id"] != ref["image_id"]
            or ref["image_id"] not in images
        ):
            raise ValueError(
                f"{refs_path}: ref {ref['ref_id']} names annotation {ref['ann_id']} of image "
                f"{ref['image_id']}, which {instances_path} does not have"
            )
        image = images[ref["image_id"]]
        for sentence in ref["sentences"]:
            samples.append(
                RefSample(
                    ref["ref_id"],
                    sentence["sent_id"],
                    sentence["sent"],
                    image["id"],
                    image["file_name"],
                    image["height"],
                    image["width"],
                    annotation["segmentation"],
                )
            )
    return samples


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def metrics(parts: list[tuple[int, int]]) -> dict:
    """cIoU and gIoU (aas/res.py) of per-sample (intersection, union) pairs."""
    if not parts:
        raise ValueError("no samples to score")
    intersections, unions = np.array(parts, dtype=np.float64).T
    ious = np.divide(intersections, unions, out=np.zeros_like(intersections), where=unions > 0)
    return {
        "ciou": float(intersections.sum() / unions.sum()) if unions.sum() else 0.0,
        "giou": float(ious.mean()),
    }


def ground_answer_span(
    engine,
    image: np.ndarray,
    question: str,
    token_count: int = RES_TOKENS,
    combine: str = "max",
    *,
    max_new_tokens: int | None = None,
) -> Grounding:
    """The reference's RES recipe (groundLMM aas/infer_attn_res.py, aas/res.py): answer the
    question greedily, merge the first `token_count` generated tokens' maps (mean-map subtracted
    over all generated steps, the end token's included as in the reference; upsampled to image
    pixels) and refine the argmax point. Returns a Grounding with that one phrase: the answer
    text its tokens cover; a token index equal to len(token_ids) is the end token's map (short
    answers)."""
    if not (isinstance(token_count, int) and token_count >= 1):
        raise InputError(f"token_count must be a positive integer, got {token_count!r}")
    answer = engine.answer(image, question, max_new_tokens=max_new_tokens)
    grid = engine.token_maps(answer.maps, answer.grid)
    tokens = list(range(min(token_count, len(grid))))
    height, width = image.shape[:2]
    # Upsampled first, then combined, as aas/res.py does: bicubic upsampling and max do not
    # commute.
    upsampled = heatmap.upsample(grid[tokens], (height, width), engine.upsample)
    heat = heatmap.combine(upsampled, range(len(tokens)), combine)
    point = heatmap.argmax_point(heat)
    heat = heat.cpu().numpy()
    engine.refiner.set_images([image])
    ((mask, score),) = engine.refiner.refine(0, [heat], [point])
    end = answer.spans[min(len(tokens), len(answer.spans)) - 1][1] if answer.spans else 0
    phrase = GroundedPhrase(
        answer.text[:end], 0, end, tokens, heat, point, mask, score, mask_bbox(mask)
    )
    return Grounding(
        question, "describe", answer.text, list(answer.token_ids), [phrase], (height, width)
    )


def ground(
    engine,
    image: np.ndarray,
    sentence: str,
    mode: str,
    *,
    template: str = RES_TEMPLATE,
    token_count: int = RES_TOKENS,
    max_new_tokens: int = PAPER_ANSWER_TOKENS,
):
    """(answer, GroundedPhrase) for one referring expression."""
    if mode == "recipe":
        grounding = ground_answer_span(
            engine,
            image,
            template.format(sentence),
            token_count,
            "max",
            max_new_tokens=max_new_tokens,
        )
    elif mode == "refer":
        grounding = engine.ground(image, sentence, mode="refer")
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return grounding.answer, grounding.phrases[0]


def run(
    engine,
    samples: list[RefSample],
    image_folder: str,
    mode: str,
    *,
    template: str = RES_TEMPLATE,
    token_count: int = RES_TOKENS,
    max_new_tokens: int = PAPER_ANSWER_TOKENS,
    prediction_path: str | None = None,
    progress=None,
) -> dict:
    """Ground every sample; cIoU, gIoU and counts. With prediction_path, one JSON line per sample
    is written as it is scored, so a long run that stops keeps what it did."""
    parts, image_cache = [], {}
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(prediction_path, "w")) if prediction_path else None
        for k, sample in enumerate(samples):
            # Only the current image: an image's refs usually come together.
            if sample.image_id not in image_cache:
                image_cache = {
                    sample.image_id: read_image(
                        image_folder, sample.file_name, (sample.height, sample.width)
                    )
                }
            answer, phrase = ground(
                engine,
                image_cache[sample.image_id],
                sample.sentence,
                mode,
                template=template,
                token_count=token_count,
                max_new_tokens=max_new_tokens,
            )
            gt = decode_segmentation(sample.segmentation, sample.height, sample.width)
            intersection, union = intersection_union(phrase.mask, gt)
            parts.append((intersection, union))
            if out is not None:
                out.write(
                    json.dumps(
                        {
                            "ref_id": sample.ref_id,
                            "sent_id": sample.sent_id,
                            "image_id": sample.image_id,
                            "sent": sample.sentence,
                            "answer": answer,
                            "point": list(phrase.point),
                            "mask": encode_mask(phrase.mask),
                            "intersection": intersection,
                            "union": union,
                        }
                    )
                    + "\n"
                )
                out.flush()
            if progress is not None:
                progress(
                    k + 1,
                    len(samples),
                    sample.sent_id,
                    f"IoU {intersection / union if union else 0.0:.3f}",
                )
    return {"samples": len(samples), "refs": len({s.ref_id for s in samples}), **metrics(parts)}
