"""The fixed-shape decoding path (StaticCache, map rows written in place) against the dynamic
one: the same tokens and maps, through the backend and through the engine in both modes, on
the tiny random LLaVA and DiffLMM. (CUDA graphs replay the same step; they need a GPU.)"""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.recorder import BufferRecorder
from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.models.static_decode import CACHE_BUCKET, cache_length

PRESETS = ("tiny-random", "tiny-difflmm-random")
QUESTION = "Describe the image in detail."


def frame(seed=0, height=48, width=80):
    return random_rgb(height, width, seed)


@pytest.fixture(scope="module", params=PRESETS)
def engines(request):
    return {
        decoding: build_engine(request.param, refiner="threshold", decoding=decoding)
        for decoding in ("dynamic", "static")
    }


def test_same_tokens_and_maps_as_the_dynamic_path(engines):
    dynamic, static = engines["dynamic"].backend, engines["static"].backend
    for seed in (0, 1):
        visual = dynamic.encode(frame(seed))
        # Random weights rarely stop: 40 tokens, and again past the first length of the same cache.
        for n_tokens in (40, 7):
            expected_ids, expected_maps = dynamic.generate(
                visual, QUESTION, n_tokens, stop_at_end=False
            )
            ids, maps = static.generate(visual, QUESTION, n_tokens, stop_at_end=False)
            assert ids == expected_ids
            assert (
                maps.shape == expected_maps.shape == (n_tokens, dynamic.grid[0] * dynamic.grid[1])
            )
            torch.testing.assert_close(maps, expected_maps, atol=1e-5, rtol=0)
    assert len(static._decoders) == 1  # one bucket served every query


def test_engine_results_are_the_same_in_both_modes(engines):
    for mode, query in (("describe", QUESTION), ("refer", "the red mug on the left")):
        expected = engines["dynamic"].ground(frame(2), query, mode)
        got = engines["static"].ground(frame(2), query, mode)
        assert got.token_ids == expected.token_ids and got.answer == expected.answer
        assert [p.text for p in got.phrases] == [p.text for p in expected.phrases]
        for a, b in zip(got.phrases, expected.phrases):
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-5)
            assert a.point == b.point


def test_streaming_cancel_and_the_end_token_behave_as_the_dynamic_path(engines):
    static = engines["static"].backend
    visual = static.encode(frame(3))
    seen = []
    ids, _ = static.generate(visual, QUESTION, 12, on_token=lambda got: seen.append(list(got)))
    assert seen == [ids[:n] for n in range(1, len(ids) + 1)]
    streamed = []
    with pytest.raises(Cancelled, match="stopped after 2 tokens"):
        static.generate(
            visual,
            QUESTION,
            12,
            on_token=streamed.append,
            should_stop=lambda: len(streamed) >= 2,
            stop_at_end=False,
        )
    ids, _ = static.generate(visual, QUESTION, 12, stop_at_end=False)
    end = {ids[2]}  # pretend the third token ends the answer: it is kept, and nothing after it
    static.end_ids, saved = end, static.end_ids
    try:
        assert static.generate(visual, QUESTION, 12)[0] == ids[: ids.index(ids[2]) + 1]
    finally:
        static.end_ids = saved


def test_warm_up_builds_the_describe_bucket_before_the_first_query():
    engine = build_engine("tiny-random", refiner="threshold", decoding="static")
    assert engine.backend._decoders == {}
    engine.warm_up()
    ((length, image_start, n_image),) = engine.backend._decoders
    before, after = engine.backend.prompt_ids(QUESTION)
    assert length == cache_length(len(before) + n_image + len(after) + engine.max_new_tokens)
    assert length % CACHE_BUCKET == 0 and image_start == len(before)
    engine.ground(frame(4), QUESTION)
    assert len(engine.backend._decoders) == 1  # the query used the warmed-up decoder
    build_engine("tiny-random", decoding="dynamic").warm_up()  # nothing to build, no error


def test_buffer_recorder_writes_rows_in_place():
    buffer, step = torch.full((1, 4, 3), 9.0), torch.zeros(1, dtype=torch.long)
    recorder = BufferRecorder([0], 3, buffer, step, layers=2)
    recorder.add(0, torch.ones(1, 1, 3))
    recorder.add(1, torch.full((1, 1, 3), 3.0))
    recorder.advance()
    recorder.add(0, torch.full((1, 1, 3), 5.0))
    recorder.add(1, torch.full((1, 1, 3), 1.0))
    recorder.advance()
    torch.testing.assert_close(recorder.maps(), torch.tensor([[[2.0] * 3, [3.0] * 3]]))
    assert int(step) == 2 and buffer[0, 2:].eq(9.0).all()


def test_bad_decoding_settings_are_refused():
    with pytest.raises(ValueError, match="decoding must be auto or one of dynamic, static, graphs"):
        build_engine("tiny-random", decoding="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_engine("tiny-random", decoding="graphs")
