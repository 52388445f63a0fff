"""LlavaStyleBackend.generate_batch: several prompts (one per camera) decoded greedily together,
one forward pass per token for all of them, each row getting what generate gives it alone, on
the tiny random LLaVA and DiffLMM and the shipped demo model."""

import pytest
import torch
from test_engine_batch import count_lm_passes, images

from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.presets import build_engine

# Different lengths, so the batch is really left-padded.
QUESTIONS = (
    "Describe the image in detail.",
    "What is here?",
    "Describe every object in the picture and where it lies, briefly.",
    "Name the shapes.",
)
LIMITS = [40, 30, 40, 12]
# Maps of a batched row against the same prompt alone. The batched pass masks padding instead of
# running unpadded, and its matrix products may sum in another order: float32 rounding (measured
# on these models: at most 3e-8, on maps that peak at 0.1).
MAP_ATOL = 1e-6


@pytest.fixture(scope="module", params=["tiny-random", "tiny-difflmm-random", "demo"])
def backend(request):
    backend = build_engine(request.param, refiner="threshold").backend
    if request.param != "demo":  # the demo model ends its answers itself
        # Random weights seldom emit their end token: here the fourth token of the first
        # prompt's answer ends answers, so some rows end at it and others at their limits.
        visual = backend.encode(images()[0])
        backend.end_ids = {backend.generate(visual, QUESTIONS[0], 4, stop_at_end=False)[0][3]}
    return backend


@pytest.fixture(scope="module")
def prompts(backend):
    return list(zip(backend.encode_batch(images()), QUESTIONS))


@pytest.fixture(scope="module")
def alone(backend, prompts):
    """What generate gives each prompt alone, with its limit."""
    return [backend.generate(visual, question, n) for (visual, question), n in zip(prompts, LIMITS)]


def assert_same(got, expected):
    ids, maps = got
    expected_ids, expected_maps = expected
    assert ids == expected_ids
    assert maps.shape == expected_maps.shape
    torch.testing.assert_close(maps, expected_maps, atol=MAP_ATOL, rtol=0)


def test_each_row_gets_what_generate_gives_it_alone_in_one_pass_per_token(backend, prompts, alone):
    lengths = [len(ids) for ids, _ in alone]
    ended = [ids[-1] in backend.end_ids for ids, _ in alone]
    # Both ways to end are covered: a row at its end token before the longest row, one at its
    # limit; and the prompts have different lengths.
    assert any(end and n < max(lengths) for end, n in zip(ended, lengths))
    assert any(not end and n == limit for end, n, limit in zip(ended, lengths, LIMITS))
    assert len({backend.prompt(*p).embeds.shape[1] for p in prompts}) > 1
    streamed = [[] for _ in prompts]
    passes, handle = count_lm_passes(backend.lm)
    try:
        got = backend.generate_batch(
            prompts,
            LIMITS,
            [lambda ids, seen=seen: seen.append(list(ids)) for seen in streamed],
            [None] * len(prompts),
        )
    finally:
        handle.remove()
    # One prefill and (longest answer - 1) steps, every pass with all four rows.
    assert passes == [len(prompts)] * max(lengths)
    for result, expected, seen in zip(got, alone, streamed):
        assert_same(result, expected)
        ids = result[0]
        assert seen == [ids[:n] for n in range(1, len(ids) + 1)]  # each row streams its own ids


def test_a_rows_own_failure_ends_only_that_row(backend, prompts, alone):
    assert all(len(ids) > 3 for ids, _ in alone[1:3])  # rows 1 and 2 would go on past 3 tokens
    seen = []
    refused = RuntimeError("the consumer went away")

    def fail_on_the_third_token(ids):
        if len(ids) == 3:
            raise refused

    got = backend.generate_batch(
        prompts,
        LIMITS,
        [None, lambda ids: seen.append(len(ids)), fail_on_the_third_token, None],
        [None, lambda: len(seen) >= 2, None, None],
    )
    assert isinstance(got[1], Cancelled) and "after 2 tokens" in str(got[1]) and seen == [1, 2]
    assert got[2] is refused
    assert_same(got[0], alone[0])
    assert_same(got[3], alone[3])


def test_a_batch_of_one_is_generate_and_static_decoding_batches_dynamically():
    static = build_engine("tiny-random", refiner="threshold", decoding="static").backend
    visual = static.encode_batch(images()[:2])
    pairs = list(zip(visual, QUESTIONS))
    expected = [static.generate(v, q, 9, stop_at_end=False) for v, q in pairs]
    assert len(static._decoders) == 1  # generate alone took the fixed-shape decoder
    passes, handle = count_lm_passes(static.lm)
    try:
        (one,) = static.generate_batch(pairs[:1], [9], [None], [None], stop_at_end=False)
        two = static.generate_batch(pairs, [9, 9], [None, None], [None, None], stop_at_end=False)
    finally:
        handle.remove()
    assert passes == [1] * 9 + [2] * 9  # alone: the static decoder's passes; two: batched
    assert_same(one, expected[0])
    for got, alone_result in zip(two, expected):
        assert_same(got, alone_result)
