"""GCG evaluation (GLaMM's metrics) on a tiny GranDf-format dataset written here: hand-made
predictions with hand-computed recall / mIoU / AP50, the phrase similarity of a tiny random
BERT against mean pooling written out, and `groundlmm eval-gcg` end to end on tiny-random."""

import json

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from PIL import Image
from pycocotools import mask as mask_utils

from groundlmm_ros.cli import main
from groundlmm_ros.paper_eval import gcg
from groundlmm_ros.paper_eval.masks import encode_mask


def box(size, y0, y1, x0, x1):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


# Two images, three GT phrases. Sizes are (H, W).
GT = {
    "img_a": (
        (20, 20),
        [("a dog", box((20, 20), 0, 10, 0, 10)), ("a red ball", box((20, 20), 10, 20, 10, 20))],
    ),
    "img_b": ((20, 30), [("a man", box((20, 30), 0, 20, 0, 15))]),
}
# Predictions with known IoUs: 80/100 with the dog, 40/100 with the ball, 200/300 with the man.
PREDICTIONS = {
    "img_a": {
        "image_id": "img_a",
        "caption": "The dog plays with a ball.",
        "phrases": ["The dog", "a ball"],
        "pred_masks": [
            encode_mask(box((20, 20), 0, 10, 0, 8)),
            encode_mask(box((20, 20), 10, 20, 10, 14)),
        ],
    },
    "img_b": {
        "image_id": "img_b",
        "caption": "A man stands.",
        "phrases": ["A man"],
        "pred_masks": [encode_mask(box((20, 30), 0, 20, 5, 15))],
    },
}


def write_dataset(folder, gt=GT):
    """GranDf's two GT files (caption JSON with labels, COCO mask JSON with RLE) and jpg images."""
    images, captions, masks = [], [], []
    for k, (image_id, (size, phrases)) in enumerate(gt.items()):
        images.append(
            {"id": image_id, "file_name": f"{image_id}.jpg", "height": size[0], "width": size[1]}
        )
        captions.append(
            {
                "id": k,
                "image_id": image_id,
                "caption": " and ".join(p for p, _ in phrases) + ".",
                "labels": [p for p, _ in phrases],
            }
        )
        for phrase, mask in phrases:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            masks.append(
                {
                    "id": len(masks) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                }
            )
        rgb = np.random.RandomState(k).randint(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"{image_id}.jpg")
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "masks.json").write_text(
        json.dumps(
            {"images": images, "annotations": masks, "categories": [{"id": 1, "name": "object"}]}
        )
    )
    return str(folder / "captions.json"), str(folder / "masks.json")


def same_words(a, b):
    """A similarity for the metric tests: 1 for the same head noun, else 0."""
    return float(a.lower().split()[-1] == b.lower().split()[-1])


def test_metrics_on_hand_made_predictions(tmp_path):
    images, coco = gcg.load_ground_truth(*write_dataset(tmp_path))
    assert [i.id for i in images] == ["img_a", "img_b"] and images[0].labels == [
        "a dog",
        "a red ball",
    ]
    metrics = gcg.score(coco, images, PREDICTIONS, same_words)
    # Recall: dog (IoU 0.8) and man (0.667) count; the ball's IoU 0.4 is under 0.5. 2 of 3 GT
    # phrases.
    assert metrics["mask_recall"] == pytest.approx(2 / 3)
    # mIoU: image a pairs 0.8 and 0.4 (any IoU > 0 pairs), image b 2/3; mean over the two images.
    assert metrics["miou"] == pytest.approx(((0.8 + 0.4) / 2 + 2 / 3) / 2)
    # AP50, all scores 1 (COCOeval keeps image order on ties): TP, FP, TP over 3 GT -> precision 1
    # up to recall 1/3 (34 of COCO's 101 recall points), 2/3 up to recall 2/3 (33 points), then 0.
    assert metrics["ap50"] == pytest.approx((34 * 1 + 33 * 2 / 3) / 101)
    assert (metrics["images"], metrics["gt_phrases"], metrics["predicted_phrases"]) == (2, 3, 3)
    # Image a alone (--limit 1): recall 1/2, mIoU 0.6, AP50 from TP, FP over 2 GT: precision 1 up to
    # recall 1/2 (51 recall points); image b's GT is not counted as missed.
    first = gcg.score(coco, images[:1], PREDICTIONS, same_words)
    assert (first["mask_recall"], first["miou"]) == (pytest.approx(0.5), pytest.approx(0.6))
    assert first["ap50"] == pytest.approx(51 / 101)


def test_matching_follows_glamm():
    g = [box((10, 10), 0, 10, 0, 5), box((10, 10), 0, 10, 5, 10)]
    p = [box((10, 10), 0, 10, 0, 5), box((10, 10), 0, 9, 5, 10)]  # IoUs 1.0 and 0.9
    # The best-IoU pair fails the text test: GLaMM's loop stops there, the second pair is not tried.
    assert gcg.image_matches(g, ["a cup", "a dog"], p, ["a mug", "a dog"], same_words) == []
    assert gcg.image_matches(g, ["a cup", "a dog"], p, ["a cup", "a dog"], same_words) == [
        (0, 0),
        (1, 1),
    ]
    # One-to-one: a prediction covering both GT masks pairs with one of them only.
    both = [box((10, 10), 0, 10, 0, 10)]
    # IoU 0.5: counts.
    assert gcg.image_matches(g, ["a cup", "a cup"], both, ["a cup"], same_words) == [(0, 0)]
    assert gcg.image_miou(both, g) == pytest.approx(0.5)
    assert gcg.image_miou([], g) == 0.0 and gcg.image_miou([box((10, 10), 0, 0, 0, 0)], g) == 0.0


def test_errors_are_clear(tmp_path):
    captions, masks = write_dataset(tmp_path)
    data = json.loads(open(masks).read())
    data["annotations"] = data["annotations"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="1 GT labels but 0 GT masks"):
        gcg.load_ground_truth(captions, str(tmp_path / "short.json"))
    with pytest.raises(ValueError, match="no such file"):
        gcg.load_ground_truth(str(tmp_path / "nope.json"), masks)
    images, coco = gcg.load_ground_truth(captions, masks)
    bad = {
        **PREDICTIONS,
        "img_b": {**PREDICTIONS["img_b"], "pred_masks": [encode_mask(np.ones((5, 5), bool))]},
    }
    with pytest.raises(ValueError, match="predicted mask is 5x5"):
        gcg.score(coco, images, bad, same_words)
    with pytest.raises(ValueError, match="not a directory"):
        gcg.PhraseSimilarity(str(tmp_path / "no-model"))


def write_tiny_text_model(folder):
    """A tiny random BERT and a WordPiece tokenizer built in code, saved as a model directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["a", "the", "dog", "man", "red", "ball", "cup", "mug", "image", "shows", "##s"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).eval()
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def test_phrase_similarity_is_mean_pooled_cosine(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    directory = write_tiny_text_model(tmp_path / "bert")
    similarity = gcg.PhraseSimilarity(directory)
    tokenizer, model = (
        AutoTokenizer.from_pretrained(directory),
        AutoModel.from_pretrained(directory).eval(),
    )

    def mean_pooled(text):  # GLaMM's get_bert_embedding
        with torch.no_grad():
            return (
                model(**tokenizer(text, return_tensors="pt"))
                .last_hidden_state[0]
                .mean(dim=0)
                .numpy()
            )

    a, b = mean_pooled("a red dog"), mean_pooled("the man")
    expected = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    # [CLS] a red dog [SEP]: all five pooled.
    assert tokenizer("a red dog").input_ids == [2, 5, 9, 7, 3]
    assert similarity("a red dog", "the man") == pytest.approx(expected, abs=1e-6)
    assert similarity("The Dog", "the dog") == pytest.approx(1.0, abs=1e-6)  # uncased
    assert abs(expected) < 0.999  # the two phrases are told apart


@pytest.mark.timeout(300)
def test_eval_gcg_end_to_end_on_tiny_random(tmp_path):
    captions, masks = write_dataset(tmp_path)
    text_model = write_tiny_text_model(tmp_path / "bert")
    predictions = tmp_path / "predictions"
    common = [
        "--captions",
        captions,
        "--masks",
        masks,
        "--text-model",
        text_model,
        "--predictions",
        str(predictions),
    ]
    out = run_cli(
        "eval-gcg",
        *common,
        "--images",
        str(tmp_path),
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "12",
        "--threads",
        "1",
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.stdout.strip().count("\n") == 0, "only the JSON goes to stdout"
    assert "gcg: image 2/2 img_b" in out.stderr
    assert metrics["task"] == "gcg" and metrics["images"] == 2 and metrics["gt_phrases"] == 3
    for key in ("mask_recall", "miou", "ap50", "ap50_95"):
        assert 0.0 <= metrics[key] <= 1.0
    # The saved predictions are GLaMM's format, and scoring them again gives the same figures.
    saved = {i: json.loads((predictions / f"{i}.json").read_text()) for i in GT}
    assert sum(len(p["phrases"]) for p in saved.values()) == metrics["predicted_phrases"]
    for image_id, record in saved.items():
        assert record["image_id"] == image_id and len(record["phrases"]) == len(
            record["pred_masks"]
        )
        assert all(mask_utils.decode(m).shape == GT[image_id][0] for m in record["pred_masks"])
    images, coco = gcg.load_ground_truth(captions, masks)
    assert gcg.score(coco, images, saved, gcg.PhraseSimilarity(text_model)) == {
        k: v for k, v in metrics.items() if k not in ("task", "model")
    }
    rescored = run_cli("eval-gcg", *common, "--rescore")
    assert rescored.returncode == 0, rescored.stderr
    assert {
        **json.loads(rescored.stdout.strip().splitlines()[-1]),
        "model": "tiny-random",
    } == metrics
    # A missing prediction file is a clear error (SystemExit with the message), not a traceback.
    (predictions / "img_b.json").unlink()
    with pytest.raises(SystemExit, match="img_b.json: no such file"):
        main(["eval-gcg", *common, "--rescore"])
