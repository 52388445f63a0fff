"""Engine.ground_batch: several requests (one per camera) in one step. The images go through one
batched encoder call, every refer expression through one teacher-forced pass, the describe
answers decode together (one pass per token), and each request gets what it gets alone; a
request's own failure ends only that request."""

import numpy as np
import pytest
from images import random_rgb

from groundlmm_ros.engine.types import Cancelled, Grounding, InputError, Request
from groundlmm_ros.models.presets import build_engine

QUESTION = "Describe the image in detail."
# Heat maps of a batched step against the same request alone, to this share of the map's peak.
# Batched matrix products on the CPU may sum in another order than batch-of-one ones: float32
# rounding (measured here: at most 1.5e-8 on a peak of 0.1, 1e-9 on a mean-subtracted 4e-4).
HEATMAP_RTOL = 1e-4


def images():
    """Four frames of different sizes, as from four cameras."""
    return [
        random_rgb(48, 80, 1),
        random_rgb(60, 44, 2),
        random_rgb(40, 40, 3),
        random_rgb(30, 90, 4),
    ]


def mixed_requests(expressions):
    """Describe and refer, one of them with several expressions, over four images."""
    first, second, third = expressions
    frames = images()
    return [
        Request(frames[0], QUESTION),
        Request(frames[1], f"{first}; {second}", "refer"),
        Request(frames[2], third, "refer"),
        Request(frames[3], QUESTION, max_new_tokens=6),
    ]


def assert_same(batched: Grounding, alone: Grounding):
    assert (batched.query, batched.mode, batched.answer, batched.token_ids) == (
        alone.query,
        alone.mode,
        alone.answer,
        alone.token_ids,
    )
    assert batched.image_size == alone.image_size
    assert len(batched.phrases) == len(alone.phrases)
    for a, b in zip(batched.phrases, alone.phrases):
        assert (a.text, a.char_start, a.char_end, a.token_indices) == (
            b.text,
            b.char_start,
            b.char_end,
            b.token_indices,
        )
        peak = float(np.abs(b.heatmap).max())
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=HEATMAP_RTOL * peak, rtol=0)
        assert a.point == b.point
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert a.bbox == b.bbox


@pytest.fixture(scope="module")
def difflmm():
    return build_engine("tiny-difflmm-random", seed=1)  # with the tiny SAM


@pytest.fixture(scope="module")
def demo():
    return build_engine("demo")


@pytest.mark.parametrize(
    "engine_name, expressions",
    [
        ("demo", ("a purple star", "the blue star", "a red star")),
        ("difflmm", ("the red mug on the left", "a dog", "the small white cup")),
    ],
)
def test_a_batched_step_gives_what_each_request_gets_alone(engine_name, expressions, request):
    engine = request.getfixturevalue(engine_name)
    requests = mixed_requests(expressions)
    batched = engine.ground_batch(requests)
    assert [type(r) for r in batched] == [Grounding] * len(requests)
    assert len(batched[1].phrases) == 2 and len(batched[2].phrases) == 1
    assert batched[0].phrases, "the describe answer has phrases to compare"
    for result, r in zip(batched, requests):
        # The refiner now holds other frames than in the batch: each request sets its own.
        alone = engine.ground(r.image, r.query, r.mode, max_new_tokens=r.max_new_tokens)
        assert_same(result, alone)
    # The shared stages' seconds are in every request's timings, the same for each.
    assert len({r.timings["encode"] for r in batched}) == 1
    assert batched[1].timings["teacher_force"] == batched[2].timings["teacher_force"]
    assert "teacher_force" not in batched[0].timings and "generate" in batched[0].timings
    for result in batched:
        assert {"encode", "refine_image", "heatmaps", "refine", "total"} <= set(result.timings)


def count_calls(monkeypatch, owner, name):
    """Wraps the real bound method owner.name; -> the list of each call's first argument."""
    method, seen = getattr(owner, name), []

    def counted(*args, **kwargs):
        seen.append(args[0] if args else next(iter(kwargs.values())))
        return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return seen


def count_lm_passes(lm):
    """A forward pre-hook on the real LM -> (the list of each pass's batch size, the handle)."""
    batches = []
    handle = lm.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["inputs_embeds"].shape[0]),
        with_kwargs=True,
    )
    return batches, handle


@pytest.mark.parametrize("model", ["tiny-random", "tiny-difflmm-random"])
def test_the_encoder_and_the_refer_pass_run_once_for_three_images(model, monkeypatch):
    engine = build_engine(model, refiner="threshold")
    backend = engine.backend
    if model == "tiny-random":  # LLaVA: the CLIP tower + projector of the transformers model
        pixels = count_calls(monkeypatch, backend.lm, "get_image_features")
    else:
        pixels = count_calls(monkeypatch, backend.prompts.encoder, "encode_image")
    frames = images()[:3]
    passes, handle = count_lm_passes(backend.lm)
    try:
        results = engine.ground_batch(
            [
                Request(frames[0], "the red mug; a dog", "refer"),
                Request(frames[1], "a cat", "refer"),
                Request(frames[2], "the small white cup", "refer"),
            ]
        )
    finally:
        handle.remove()
    assert all(isinstance(r, Grounding) for r in results)
    assert [p.shape[0] for p in pixels] == [3]  # one encoder call, all three images
    assert passes == [4]  # one teacher-forced pass, all four expressions


@pytest.mark.parametrize("engine_name", ["demo", "difflmm"])
def test_describe_answers_decode_together_as_each_alone(engine_name, request):
    engine = request.getfixturevalue(engine_name)
    queries = (QUESTION, "What is here?", "Name the shapes and their colours.", QUESTION)
    limits = (None, 5, 9, 3)
    streamed = [[] for _ in queries]
    requests = [
        Request(frame, query, on_token=lambda text, n, seen=seen: seen.append((text, n)))
        for frame, query, seen in zip(images(), queries, streamed)
    ]
    for r, limit in zip(requests, limits):
        r.max_new_tokens = limit
    passes, handle = count_lm_passes(engine.backend.lm)
    try:
        batched = engine.ground_batch(requests)
    finally:
        handle.remove()
    assert [type(r) for r in batched] == [Grounding] * len(requests)
    assert any(r.phrases for r in batched), "some answer has phrases to compare"
    # Each row's generated tokens: its answer plus the end token, unless it stopped at its limit.
    generated = [
        n if n == min(r.max_new_tokens or engine.max_new_tokens, engine.max_new_tokens) else n + 1
        for n, r in ((len(result.token_ids), r) for result, r in zip(batched, requests))
    ]
    # One prefill and (longest - 1) steps, all four rows in each.
    assert passes == [4] * max(generated)
    assert len({r.timings["generate"] for r in batched}) == 1  # one shared stage
    for result, r, seen in zip(batched, requests, streamed):
        alone_seen = []
        alone = engine.ground(
            r.image,
            r.query,
            max_new_tokens=r.max_new_tokens,
            on_token=lambda text, n: alone_seen.append((text, n)),
        )
        assert_same(result, alone)
        assert seen == alone_seen  # each request streams its own answer as it would alone


def test_a_requests_own_failure_ends_only_that_request(difflmm, monkeypatch):
    frames = images()
    pixels = count_calls(monkeypatch, difflmm.backend.prompts.encoder, "encode_image")
    seen = []

    def fail_on_the_second_token(text, n):
        if n == 2:
            raise RuntimeError("the consumer went away")

    requests = [
        Request(frames[0], QUESTION, max_new_tokens=6),
        Request(frames[1], "  ", "refer"),  # empty query
        Request(frames[2].astype(np.float32), QUESTION),  # wrong dtype
        Request(frames[3], "a dog; the red mug", "refer"),
        Request(frames[1], QUESTION, should_stop=lambda: True),  # cancelled before it starts
        Request(frames[2], QUESTION, on_token=fail_on_the_second_token),
        Request(frames[0], "a cat", "segment"),  # unknown mode
        # Cancelled after its second token.
        Request(
            frames[3],
            QUESTION,
            on_token=lambda text, n: seen.append(n),
            should_stop=lambda: len(seen) >= 2,
        ),
    ]
    results = difflmm.ground_batch(requests)
    assert isinstance(results[1], InputError) and "empty" in str(results[1])
    assert isinstance(results[2], InputError) and "uint8" in str(results[2])
    assert isinstance(results[4], Cancelled)
    assert isinstance(results[5], RuntimeError) and str(results[5]) == "the consumer went away"
    assert isinstance(results[6], InputError) and "mode" in str(results[6])
    assert isinstance(results[7], Cancelled) and seen == [1, 2]
    # Refused and cancelled requests never reach the model: one encoder call for the other four.
    assert [p.shape[0] for p in pixels] == [4]
    for i in (0, 3):
        r = requests[i]
        assert_same(results[i], difflmm.ground(r.image, r.query, r.mode, max_new_tokens=6))


def test_a_shared_stage_failure_ends_every_request_in_it(difflmm, monkeypatch):
    frames = images()
    requests = [
        Request(frames[0], QUESTION, max_new_tokens=4),
        Request(frames[1], "a dog; the red mug", "refer"),
        Request(frames[2], "a cat", "refer"),
        Request(frames[3], ""),
    ]
    lm = difflmm.backend.lm
    out_of_memory = RuntimeError("out of memory in the batched pass")

    def fail_the_batched_pass(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[0] > 1:
            raise out_of_memory

    handle = lm.register_forward_pre_hook(fail_the_batched_pass, with_kwargs=True)
    try:
        results = difflmm.ground_batch(requests)
    finally:
        handle.remove()
    assert isinstance(results[0], Grounding)  # describe: not in the teacher-forced pass
    assert results[1] is out_of_memory and results[2] is out_of_memory
    assert isinstance(results[3], InputError)

    def fail_the_encoder(pixels):
        raise out_of_memory

    monkeypatch.setattr(difflmm.backend.prompts.encoder, "encode_image", fail_the_encoder)
    results = difflmm.ground_batch(requests)
    assert results[:3] == [out_of_memory] * 3 and isinstance(results[3], InputError)
    with pytest.raises(RuntimeError, match="out of memory"):
        difflmm.ground(frames[0], QUESTION)
    monkeypatch.undo()
    # Two describe requests share the decoding passes: a failed one ends both.
    handle = lm.register_forward_pre_hook(fail_the_batched_pass, with_kwargs=True)
    try:
        results = difflmm.ground_batch([Request(frame, QUESTION) for frame in frames[:2]])
    finally:
        handle.remove()
    assert results == [out_of_memory] * 2


def test_nothing_to_do(difflmm):
    assert difflmm.ground_batch([]) == []


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl-random", "tiny-llava-next-random"])
def test_chat_template_backends_batch_as_alone(model):
    """Images with their own token counts (and Qwen2.5-VL's own 3D positions), encoded one at a
    time, then in one teacher-forced pass and one decoding pass per token for all of them."""
    engine = build_engine(model, seed=2)
    requests = mixed_requests(("the red mug on the left", "a dog", "a cat"))
    batched = engine.ground_batch(requests)
    assert [type(r) for r in batched] == [Grounding] * len(requests)
    for result, r in zip(batched, requests):
        alone = engine.ground(r.image, r.query, r.mode, max_new_tokens=r.max_new_tokens)
        assert_same(result, alone)
    # Two frames of one size (the same token count) and one of another.
    same_size = [random_rgb(60, 44, 5), random_rgb(60, 44, 6), random_rgb(40, 40, 7)]
    passes, handle = count_lm_passes(engine.backend.lm)
    try:
        results = engine.ground_batch([Request(f, "a dog", "refer") for f in same_size])
    finally:
        handle.remove()
    assert all(isinstance(r, Grounding) for r in results)
    assert passes == [3]
    describe = [Request(f, QUESTION, max_new_tokens=4) for f in same_size[:2]]
    passes, handle = count_lm_passes(engine.backend.lm)
    try:
        results = engine.ground_batch(describe)
    finally:
        handle.remove()
    assert set(passes) == {2}
    for result, r in zip(results, describe):
        assert_same(result, engine.ground(r.image, r.query, max_new_tokens=4))
