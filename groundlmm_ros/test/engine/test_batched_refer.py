"""Several referring expressions in one refer query: one batched, left-padded teacher-forced
pass gives each expression what it gets alone (maps to 1e-5, the same point and mask)."""

import numpy as np
import pytest
import torch
from images import random_rgb

from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.presets import build_engine

EXPRESSIONS = ["the red mug on the left", "a dog", "the small white cup next to the laptop"]


def frame(seed=0):
    return random_rgb(60, 44, seed)


@pytest.fixture(scope="module", params=["tiny-random", "tiny-difflmm-random"])
def engine(request):
    return build_engine(request.param, seed=1)  # with the tiny SAM


def test_batched_maps_equal_one_at_a_time(engine):
    backend = engine.backend
    visual = backend.encode(frame())
    answers = [backend.encode_text(e) for e in EXPRESSIONS]
    assert len({len(a) for a in answers}) > 1  # really padded
    batched = backend.teacher_force_batch(engine.refer_question, [(visual, ids) for ids in answers])
    for ids, maps in zip(answers, batched):
        alone = backend.teacher_force(visual, engine.refer_question, ids)
        assert (
            maps.shape
            == alone.shape
            == (len(ids), backend.prompts.grid[0] * backend.prompts.grid[1])
        )
        torch.testing.assert_close(maps, alone, atol=1e-5, rtol=0)


def test_one_query_grounds_each_expression_as_alone(engine):
    together = engine.ground(frame(), "; ".join(EXPRESSIONS) + " ;", "refer")
    assert len(together.phrases) == len(EXPRESSIONS)
    assert together.answer == "; ".join(EXPRESSIONS)
    first = 0
    for phrase, expression in zip(together.phrases, EXPRESSIONS):
        alone = engine.ground(frame(), expression, "refer")
        (expected,) = alone.phrases
        assert together.answer[phrase.char_start : phrase.char_end] == phrase.text == expression
        # Token indices point into the concatenated ids, at this expression's own tokens.
        assert [together.token_ids[t] for t in phrase.token_indices] == [
            alone.token_ids[t] for t in expected.token_indices
        ]
        assert min(phrase.token_indices) >= first
        first += len(alone.token_ids)
        np.testing.assert_allclose(phrase.heatmap, expected.heatmap, atol=1e-5)
        assert phrase.point == expected.point
        np.testing.assert_array_equal(phrase.mask, expected.mask)
        assert phrase.score == pytest.approx(expected.score, abs=1e-5)
    assert len(together.token_ids) == first


def test_a_query_without_an_expression_is_refused(engine):
    with pytest.raises(InputError, match="no referring expression"):
        engine.ground(frame(), " ; ;", "refer")
