"""The one decoder (models/decoder.py) as the engine and the node use it: streaming, cancelling
and the end token; the compiled per-token step against the eager one (the same tokens, the same
maps), through the backend and through the engine; warm-up; refused settings."""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.decoder import CACHE_BUCKET, batch_bucket, cache_length
from groundlmm_ros.models.presets import build_engine

QUESTION = "Describe the image in detail."


def frame(seed=0, height=48, width=80):
    return random_rgb(height, width, seed)


def test_streaming_cancel_and_the_end_token():
    backend = build_engine("tiny-random", refiner="threshold").backend
    visual = backend.encode(frame(3))
    seen = []
    ids, _ = backend.generate(visual, QUESTION, 12, on_token=lambda got: seen.append(list(got)))
    assert seen == [ids[:n] for n in range(1, len(ids) + 1)]
    streamed = []
    with pytest.raises(Cancelled, match="stopped after 2 tokens"):
        backend.generate(
            visual,
            QUESTION,
            12,
            on_token=streamed.append,
            should_stop=lambda: len(streamed) >= 2,
            stop_at_end=False,
        )
    ids, _ = backend.generate(visual, QUESTION, 12, stop_at_end=False)
    end = {ids[2]}  # pretend the third token ends the answer: it is kept, and nothing after it
    backend.end_ids, saved = end, backend.end_ids
    try:
        assert backend.generate(visual, QUESTION, 12)[0] == ids[: ids.index(ids[2]) + 1]
    finally:
        backend.end_ids = saved


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 8]
    assert [cache_length(n) for n in (1, CACHE_BUCKET, CACHE_BUCKET + 1)] == [
        CACHE_BUCKET,
        CACHE_BUCKET,
        2 * CACHE_BUCKET,
    ]


def test_warm_up_builds_the_buckets_a_step_can_use():
    engine = build_engine("tiny-random", refiner="threshold")
    decoder = engine.backend.decoder
    # An eager decoder (no CUDA graph, not compiled) has nothing to prepare: configure leaves
    # the model unrun.
    assert engine.warm_up(3) >= 0 and decoder.buffers == {}
    # What warm-up does for graphs or a compiled step: steps of 1, 2 or 3 requests use buckets
    # of 1, 2 and 4 rows.
    with torch.inference_mode():
        prompt = engine.backend.prompts.prompt(engine.backend.encode(frame(4)), QUESTION)
    decoder.warm_up(prompt, [1, 2, 3], engine.max_new_tokens)
    before, after = engine.backend.prompts.prompt_ids(QUESTION)
    n_image = engine.backend.prompts.grid[0] * engine.backend.prompts.grid[1]
    length = cache_length(len(before) + n_image + len(after) + engine.max_new_tokens)
    rows = cache_length(engine.max_new_tokens)
    assert set(decoder.buffers) == {(1, length, rows), (2, length, rows), (4, length, rows)}
    engine.ground(frame(4), QUESTION)
    assert len(decoder.buffers) == 3  # the query used a warmed-up bucket


# The compiled step (torch.compile, inductor on the CPU's C++ compiler) against the eager one.
# Compiling takes tens of seconds here: one model, one batch of two rows.
@pytest.fixture(scope="module")
def compiled():
    return {
        setting: build_engine("tiny-random", refiner="threshold", compile=setting)
        for setting in ("off", "on")
    }


def assert_compiled_step_is_the_eager_one(eager, fast):
    """A batch of two rows of different lengths, compiled against eager: the same tokens, the
    same maps."""
    assert (eager.decoder.compile, fast.decoder.compile) == (False, True)
    prompts = list(zip(eager.encode_batch([frame(0), frame(1, 60, 40)]), [QUESTION, "What?"]))
    expected = eager.generate_batch(prompts, [40, 30], [None] * 2, [None] * 2, stop_at_end=False)
    got = fast.generate_batch(prompts, [40, 30], [None] * 2, [None] * 2, stop_at_end=False)
    for (ids, maps), (expected_ids, expected_maps) in zip(got, expected):
        assert ids == expected_ids and len(ids) in (40, 30)
        torch.testing.assert_close(maps, expected_maps, atol=1e-5, rtol=0)


def test_the_compiled_step_gives_the_eager_steps_tokens_and_maps(compiled):
    assert_compiled_step_is_the_eager_one(compiled["off"].backend, compiled["on"].backend)


def test_the_compiled_step_takes_qwen_3d_positions():
    """Qwen2.5-VL's step has one more static input, its (3, B, 1) positions."""
    eager, fast = (
        build_engine("tiny-qwen2.5-vl-random", refiner="threshold", compile=setting).backend
        for setting in ("off", "on")
    )
    assert_compiled_step_is_the_eager_one(eager, fast)


def test_engine_results_are_the_same_compiled(compiled):
    for mode, query in (("describe", QUESTION), ("refer", "the red mug on the left")):
        expected = compiled["off"].ground(frame(2), query, mode)
        got = compiled["on"].ground(frame(2), query, mode)
        assert got.token_ids == expected.token_ids and got.answer == expected.answer
        assert [p.text for p in got.phrases] == [p.text for p in expected.phrases]
        for a, b in zip(got.phrases, expected.phrases):
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-5)
            assert a.point == b.point


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        build_engine("tiny-random", compile="fast")
