"""RES evaluation on a tiny RefCOCO-format dataset written here (refs pickle, instances.json with
polygon, RLE and uncompressed-RLE masks, jpg/png images): loading, cIoU / gIoU by hand, the RES
recipe's heat map against the reference's formula written out, and `groundlmm eval-res` end to
end."""

import collections
import json
import os
import pickle

import numpy as np
import pytest
import torch.nn.functional as F
from cli_runs import run_cli
from PIL import Image
from pycocotools import mask as mask_utils

from groundlmm_ros.cli import main
from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.paper_eval import res

SIZES = {1: (24, 32), 2: (30, 20)}  # image id -> (H, W)


def box(size, y0, y1, x0, x1):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


GT = {
    10: box(SIZES[1], 3, 9, 2, 12),
    11: box(SIZES[1], 12, 20, 16, 28),
    20: box(SIZES[2], 5, 25, 4, 16),
}


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def write_dataset(folder):
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 24, "width": 32},
        {"id": 2, "file_name": "COCO_train2014_000000000002.png", "height": 30, "width": 20},
    ]
    compressed = mask_utils.encode(np.asfortranarray(GT[11].astype(np.uint8)))
    annotations = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]],
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": {"size": compressed["size"], "counts": compressed["counts"].decode()},
        },
        {
            "id": 20,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": uncompressed_rle(GT[20]),
        },
    ]
    refs = [
        {
            "ref_id": 100,
            "ann_id": 10,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": [
                {"sent_id": 1000, "sent": "the man on the left"},
                {"sent_id": 1001, "sent": "left guy"},
            ],
        },
        {
            "ref_id": 101,
            "ann_id": 11,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": [{"sent_id": 1010, "sent": "red cup"}],
        },
        {
            "ref_id": 200,
            "ann_id": 20,
            "image_id": 2,
            "split": "testA",
            "category_id": 1,
            "sentences": [{"sent_id": 2000, "sent": "the dog"}],
        },
        {
            "ref_id": 201,
            "ann_id": 20,
            "image_id": 2,
            "split": "val",
            "category_id": 1,
            "sentences": [{"sent_id": 2010, "sent": "a white dog"}],
        },
    ]
    (folder / "instances.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "object"}],
            }
        )
    )
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the released pickles are protocol 2 (Python 2)
    for k, image in enumerate(images):
        rgb = np.random.RandomState(k).randint(
            0, 256, (image["height"], image["width"], 3), dtype=np.uint8
        )
        Image.fromarray(rgb).save(folder / image["file_name"])
    return str(folder / "refs(unc).p"), str(folder / "instances.json")


def test_samples_are_every_sentence_of_the_split(tmp_path):
    refs, instances = write_dataset(tmp_path)
    samples = res.load_samples(refs, instances, "val")
    assert [(s.ref_id, s.sent_id, s.sentence) for s in samples] == [
        (100, 1000, "the man on the left"),
        (100, 1001, "left guy"),
        (101, 1010, "red cup"),
        (201, 2010, "a white dog"),
    ]
    ann_of_ref = {100: 10, 101: 11, 201: 20}
    for s in samples:  # polygon, compressed RLE and uncompressed RLE all decode to the drawn boxes
        assert np.array_equal(
            res.decode_segmentation(s.segmentation, s.height, s.width), GT[ann_of_ref[s.ref_id]]
        )
    assert [s.sent_id for s in res.load_samples(refs, instances, "testA")] == [2000]
    with pytest.raises(ValueError, match="no refs in split 'testB'"):
        res.load_samples(refs, instances, "testB")


def test_bad_files_are_refused(tmp_path):
    refs, instances = write_dataset(tmp_path)
    # Anything but plain data would run code when unpickled.
    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump([collections.OrderedDict(a=1)], f, protocol=2)
    with pytest.raises(ValueError, match="only plain data"):
        res.load_refs(str(tmp_path / "evil.p"))
    data = json.loads(open(instances).read())
    data["annotations"] = data["annotations"][1:]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="ref 100 names annotation 10"):
        res.load_samples(refs, str(tmp_path / "partial.json"), "val")


def test_ciou_and_giou_by_hand():
    scores = res.metrics([(80, 100), (40, 100), (200, 300)])
    assert scores["ciou"] == pytest.approx(320 / 500)  # cumulative I / cumulative U
    assert scores["giou"] == pytest.approx((0.8 + 0.4 + 2 / 3) / 3)  # mean per-sentence IoU
    assert res.intersection_union(box((4, 4), 0, 2, 0, 4), box((4, 4), 0, 4, 0, 2)) == (4, 12)
    with pytest.raises(ValueError):
        res.metrics([])


@pytest.fixture(scope="module")
def engine():
    return build_engine("tiny-random", seed=0)


@pytest.mark.parametrize("max_new_tokens", [12, 3])
def test_recipe_merges_the_first_8_token_maps_by_max(engine, max_new_tokens):
    """The reference's aas/res.py written out: maps minus their mean over all generated steps,
    bicubic to the padded square, centre crop, max over the first 8, argmax -> SAM point prompt."""
    image = np.random.RandomState(3).randint(0, 256, (24, 40, 3), dtype=np.uint8)
    question = res.RES_TEMPLATE.format("the red cup")
    result = res.ground_answer_span(
        engine, image, question, 8, "max", max_new_tokens=max_new_tokens
    )
    ids, maps = engine.backend.generate(engine.backend.encode(image), question, max_new_tokens)
    attentions = maps.float().reshape(len(ids), *engine.backend.prompts.grid)
    attentions = attentions - attentions.mean(dim=0)
    side = 40
    square = F.interpolate(
        attentions.unsqueeze(0), size=(side, side), mode="bicubic", align_corners=False
    )[0]
    scores = square[:, (side - 24) // 2 : (side - 24) // 2 + 24, :][:8].amax(dim=0).numpy()
    y, x = np.unravel_index(int(np.argmax(scores)), scores.shape)
    phrase = result.phrases[0]
    assert phrase.token_indices == list(range(min(8, len(ids))))
    np.testing.assert_allclose(phrase.heatmap, scores, atol=1e-5)
    assert phrase.point == (int(x), int(y))
    sam_masks, _, _ = engine.refiner.predictor.predict(
        point_coords=np.array([[x, y]], np.float32),
        point_labels=np.array([1]),
        multimask_output=True,
    )
    assert np.array_equal(phrase.mask, sam_masks[-1])  # the last of SAM's three masks (aas/gcg.py)
    assert (
        result.answer.startswith(phrase.text)
        and result.answer == engine.ground(image, question, max_new_tokens=max_new_tokens).answer
    )


def test_recipe_refuses_bad_input(engine):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="token_count"):
        res.ground_answer_span(engine, image, "Describe it.", 0)
    with pytest.raises(InputError, match="empty query"):
        res.ground_answer_span(engine, image, " ", 8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", res.MODES)
def test_eval_res_end_to_end_on_tiny_random(tmp_path, mode):
    refs, instances = write_dataset(tmp_path)
    predictions = tmp_path / "predictions.jsonl"
    out = run_cli(
        "eval-res",
        "--refs",
        refs,
        "--instances",
        instances,
        "--images",
        str(tmp_path),
        "--split",
        "val",
        "--mode",
        mode,
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "6",
        "--threads",
        "1",
        "--predictions",
        str(predictions),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().count("\n") == 0, "only the JSON goes to stdout"
    assert "res: sentence 4/4 2010" in out.stderr
    metrics = json.loads(out.stdout)
    assert (
        metrics["task"],
        metrics["mode"],
        metrics["split"],
        metrics["samples"],
        metrics["refs"],
    ) == ("res", mode, "val", 4, 3)
    # Recomputed from the saved masks against the drawn GT boxes.
    saved = [json.loads(line) for line in predictions.read_text().splitlines()]
    ann_of_ref = {100: 10, 101: 11, 201: 20}
    parts = []
    for record in saved:
        mask = mask_utils.decode(record["mask"]).astype(bool)
        gt = GT[ann_of_ref[record["ref_id"]]]
        parts.append(((mask & gt).sum(), (mask | gt).sum()))
        assert (record["intersection"], record["union"]) == parts[-1]
    intersections, unions = np.array(parts, float).T
    assert metrics["ciou"] == pytest.approx(intersections.sum() / unions.sum())
    assert metrics["giou"] == pytest.approx(np.mean(intersections / unions))
    assert 0.0 <= metrics["ciou"] <= 1.0 and 0.0 <= metrics["giou"] <= 1.0
    if mode == "refer":
        # Refer mode teacher-forces it.
        assert [r["answer"] for r in saved] == [r["sent"] for r in saved]


def test_eval_res_missing_image_fails_before_the_model_loads(tmp_path):
    refs, instances = write_dataset(tmp_path)
    os.remove(tmp_path / "COCO_train2014_000000000002.png")
    with pytest.raises(
        SystemExit, match=r"1 image\(s\) missing .* e.g. COCO_train2014_000000000002.png"
    ):
        # Never built: the image check comes first.
        main(
            [
                "eval-res",
                "--refs",
                refs,
                "--instances",
                instances,
                "--images",
                str(tmp_path),
                "--model",
                "no-such-model",
            ]
        )
