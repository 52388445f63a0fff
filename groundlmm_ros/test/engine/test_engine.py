"""Engine end to end on the tiny random LLaVA: both modes, SAM and the fallback, determinism,
streaming, cancel, limits and bad input."""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.engine import Engine, mask_bbox
from groundlmm_ros.engine.phrases import noun_phrases, token_spans
from groundlmm_ros.engine.refiners import SamRefiner, ThresholdRefiner
from groundlmm_ros.engine.types import Cancelled, Grounding, InputError
from groundlmm_ros.models.presets import PRESETS, build_engine

QUESTION = "Describe the image in detail."


@pytest.fixture(scope="module")
def sam_engine():
    return build_engine("tiny-random", seed=0)


@pytest.fixture(scope="module")
def fallback_engine():
    return build_engine("tiny-random", seed=0, refiner="threshold")


def image(height=48, width=80, seed=0):
    return random_rgb(height, width, seed)


def check_phrases(result: Grounding, height, width):
    assert result.image_size == (height, width)
    for phrase in result.phrases:
        assert result.answer[phrase.char_start : phrase.char_end] == phrase.text
        assert phrase.token_indices and all(
            0 <= i < len(result.token_ids) for i in phrase.token_indices
        )
        assert phrase.heatmap.shape == (height, width) and phrase.heatmap.dtype == np.float32
        assert phrase.mask.shape == (height, width) and phrase.mask.dtype == bool
        row, column = np.unravel_index(int(np.argmax(phrase.heatmap)), phrase.heatmap.shape)
        assert phrase.point == (column, row)
        assert phrase.bbox == mask_bbox(phrase.mask)
        assert np.isfinite(phrase.score)


def test_describe_with_sam(sam_engine):
    assert isinstance(sam_engine.refiner, SamRefiner)
    streamed = []
    result = sam_engine.ground(
        image(), QUESTION, on_token=lambda text, n: streamed.append((text, n))
    )
    assert result.mode == "describe" and result.query == QUESTION
    tokenizer = sam_engine.backend.tokenizer
    # Unstripped, as grouped.
    assert result.answer == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert tokenizer.eos_token_id not in result.token_ids
    # Every noun chunk of the answer is grounded (no filters by default).
    answer, spans = token_spans(
        result.token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    )
    assert [p.text for p in result.phrases] == [
        p.text for p in noun_phrases(answer, spans, sam_engine.nlp)
    ]
    assert result.phrases, "the fixed seed's answer has noun chunks"
    check_phrases(result, 48, 80)
    # Streaming: one call per generated token, growing prefixes ending at the answer.
    assert [n for _, n in streamed] == list(range(1, len(streamed) + 1))
    # One more for the end token.
    assert len(streamed) in (len(result.token_ids), len(result.token_ids) + 1)
    assert streamed[-1][0] == result.answer
    assert set(result.timings) == {
        "encode",
        "generate",
        "phrases",
        "heatmaps",
        "refine_image",
        "refine",
        "total",
    }
    assert (
        result.timings["total"] >= sum(v for k, v in result.timings.items() if k != "total") * 0.99
    )


def test_refer_with_sam_gives_exactly_one_mask(sam_engine):
    expression = "the red mug on the left"
    result = sam_engine.ground(image(64, 40), expression, "refer")
    assert result.answer == expression and len(result.phrases) == 1
    phrase = result.phrases[0]
    assert (phrase.text, phrase.char_start, phrase.char_end) == (expression, 0, len(expression))
    tokenizer = sam_engine.backend.tokenizer
    root_text = tokenizer.decode([result.token_ids[i] for i in phrase.token_indices])
    assert root_text.strip() == "mug"
    check_phrases(result, 64, 40)
    assert "teacher_force" in result.timings and "generate" not in result.timings


def test_fallback_in_both_modes(fallback_engine):
    assert isinstance(fallback_engine.refiner, ThresholdRefiner)
    for mode, query in (("describe", QUESTION), ("refer", "a dog")):
        result = fallback_engine.ground(image(30, 90), query, mode)
        assert result.phrases
        check_phrases(result, 30, 90)
        for phrase in result.phrases:
            assert phrase.score == 1.0
            assert phrase.mask[phrase.point[1], phrase.point[0]]


def test_deterministic_for_a_seed():
    first = build_engine("tiny-random", seed=7).ground(image(seed=3), QUESTION)
    again = build_engine("tiny-random", seed=7).ground(image(seed=3), QUESTION)
    other = build_engine("tiny-random", seed=8).ground(image(seed=3), QUESTION)
    assert first.token_ids == again.token_ids and first.answer == again.answer
    assert len(first.phrases) == len(again.phrases)
    for a, b in zip(first.phrases, again.phrases):
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert (a.point, a.score) == (b.point, b.score)
    assert other.token_ids != first.token_ids


def test_cancel_between_tokens(fallback_engine):
    seen = []
    with pytest.raises(Cancelled):
        fallback_engine.ground(
            image(),
            QUESTION,
            on_token=lambda text, n: seen.append(n),
            should_stop=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]  # stopped right after the token that asked for it
    with pytest.raises(Cancelled):
        fallback_engine.ground(image(), QUESTION, should_stop=lambda: True)


def test_max_new_tokens_limits_the_answer(fallback_engine):
    result = fallback_engine.ground(image(), QUESTION, max_new_tokens=3)
    assert len(result.token_ids) <= 3


def test_filters(fallback_engine):
    engine = Engine(fallback_engine.backend, ThresholdRefiner(), min_score=1.5)
    assert engine.ground(image(), "a dog", "refer").phrases == []
    engine = Engine(fallback_engine.backend, ThresholdRefiner(), nms_iou=0.0)  # any overlap merges
    result = engine.ground(image(), QUESTION)
    masks = [p.mask for p in result.phrases]
    assert all(not (a & b).any() for i, a in enumerate(masks) for b in masks[i + 1 :])


@pytest.mark.parametrize(
    "bad_image",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
        [[0, 0, 0]],
    ],
)
def test_bad_images_are_refused_before_model_work(fallback_engine, monkeypatch, bad_image):
    monkeypatch.setattr(
        fallback_engine.backend, "encode_batch", lambda images: pytest.fail("the model ran")
    )
    with pytest.raises(InputError, match="image"):
        fallback_engine.ground(bad_image, QUESTION)


@pytest.mark.parametrize(
    "query, mode, limit, message",
    [
        ("", "describe", None, "empty"),
        ("   \n", "refer", None, "empty"),
        ("x" * 1001, "describe", None, "max_query_length=1000"),
        ("a mug", "segment", None, "mode"),
        ("a mug", "describe", 0, "max_new_tokens"),
    ],
)
def test_bad_queries_are_refused_before_model_work(
    fallback_engine, monkeypatch, query, mode, limit, message
):
    monkeypatch.setattr(
        fallback_engine.backend, "encode_batch", lambda images: pytest.fail("the model ran")
    )
    with pytest.raises(InputError, match=message):
        fallback_engine.ground(image(), query, mode, max_new_tokens=limit)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="combine"):
        build_engine("tiny-random", combine="median")
    with pytest.raises(ValueError, match="refiner"):
        build_engine("tiny-random", refiner="grabcut")
    assert PRESETS["llava-1.5-7b"].sam is None
    with pytest.raises(ValueError, match="sam_checkpoint"):  # refused before any weights load
        build_engine("llava-1.5-7b", refiner="sam")
    with pytest.raises(ValueError, match="neither a preset"):
        build_engine("/no/such/model")


def test_model_directory_loads_like_the_preset(tmp_path, fallback_engine):
    """A llava-hf style directory (safetensors + tokenizer) goes through load_llava and answers
    exactly like the in-memory model it was saved from."""
    backend = fallback_engine.backend
    backend.lm.save_pretrained(tmp_path)
    backend.tokenizer.save_pretrained(tmp_path)
    loaded = build_engine(str(tmp_path), refiner="threshold", max_new_tokens=24)
    expected = fallback_engine.ground(image(seed=5), QUESTION)
    result = loaded.ground(image(seed=5), QUESTION)
    assert result.token_ids == expected.token_ids
    for a, b in zip(result.phrases, expected.phrases):
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)


def test_llava_v1_prompt_and_image_token_split(fallback_engine):
    """tokenizer_image_token's way: chunks tokenized apart, BOS only in front; the visual
    tokens sit between them."""
    backend = fallback_engine.backend
    tokenizer = backend.tokenizer
    before, after = backend.prompts.prompt_ids("What is on the table?")
    assert before[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in after
    # The paper's GCG template (LLaVA's conv_llava_v1) unless the model says otherwise.
    assert backend.prompts.conversation == "llava_v1"
    assert tokenizer.decode(before, skip_special_tokens=True) == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. USER: "
    )
    assert tokenizer.decode(after) == "\nWhat is on the table? ASSISTANT:"
    visual = backend.encode(image())
    prompt = backend.prompts.prompt(visual, "What is on the table?")
    assert prompt.image_start == len(before) and prompt.n_image == visual.shape[0] == 36
    assert prompt.embeds.shape == (1, len(before) + 36 + len(after), visual.shape[1])
    torch.testing.assert_close(prompt.embeds[0, len(before) : len(before) + 36], visual)


def test_conversation_template_is_a_setting():
    """LLaVA's conv_vicuna_v1 (what Vicuna, LLaVA-1.5 and DiffLMM were trained with) on request."""
    engine = build_engine("tiny-random", refiner="threshold", conversation="vicuna_v1")
    tokenizer = engine.backend.tokenizer
    before, _ = engine.backend.prompts.prompt_ids("What is on the table?")
    assert tokenizer.decode(before, skip_special_tokens=True) == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: "
    )
    with pytest.raises(ValueError, match="conversation must be one of vicuna_v1, llava_v1"):
        build_engine("tiny-random", conversation="chatml")


def test_paper_settings_are_the_default_and_dtype_auto_follows_the_device():
    from groundlmm_ros.models.presets import resolve_dtype

    engine = build_engine("tiny-difflmm-random", refiner="threshold")
    assert (engine.combine, engine.normalise, engine.backend.prompts.conversation) == (
        "max",
        True,
        "llava_v1",
    )
    assert engine.backend.lm.dtype == torch.float32  # dtype "auto" on the CPU
    assert (
        resolve_dtype("auto", "cuda:1") == torch.float16
        and resolve_dtype("auto", "cpu") == torch.float32
    )
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16"):
        build_engine("tiny-random", dtype="float8")


@pytest.mark.parametrize(
    "height, width, top, left", [(20, 50, 15, 0), (50, 20, 0, 15), (21, 50, 14, 0)]
)
def test_pad_to_square_centres_the_image(height, width, top, left):
    from groundlmm_ros.models.llava_prompts import pad_to_square, to_pixel_values

    picture = np.full((height, width, 3), 200, np.uint8)
    square = pad_to_square(picture, (1, 2, 3))
    assert square.shape == (50, 50, 3)
    np.testing.assert_array_equal(square[top : top + height, left : left + width], picture)
    assert square[0, 0].tolist() == ([1, 2, 3] if (top or left) else [200, 200, 200])
    pixels = to_pixel_values(square, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_a_question_holding_the_image_placeholder_is_refused_clearly(fallback_engine):
    # The LLaVA prompt is split at "<image>"; a second one in the question cannot be placed.
    with pytest.raises(InputError, match="contains '<image>', which the prompt keeps for the"):
        fallback_engine.ground(image(), "What is <image> here?", "describe")
    assert fallback_engine.ground(image(), "What is here?", "describe", max_new_tokens=2).answer
