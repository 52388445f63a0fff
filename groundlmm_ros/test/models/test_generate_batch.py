"""Backend.generate_batch: 1 to 4 prompts (one per camera) decoded greedily together by the one
fixed-shape decoder, one forward pass per token for all of them, each row getting what it gets
decoded alone (the same tokens, maps to 1e-6); rows of different prompt lengths, ending at their
end token or their limit, cancelled or failing on their own. On the tiny random LLaVA and
DiffLMM, the shipped demo model and every chat-template backend."""

import pytest
import torch
from test_engine_batch import count_lm_passes, images

from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.decoder import batch_bucket
from groundlmm_ros.models.llava_prompts import LlavaPrompts
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


@pytest.fixture(
    scope="module",
    params=[
        "tiny-random",
        "tiny-difflmm-random",
        "demo",
        "tiny-qwen2.5-vl-random",
        "tiny-llava-next-random",
        "tiny-internvl-random",
    ],
)
def backend(request):
    backend = build_engine(request.param, refiner="threshold").backend
    if request.param != "demo":  # the demo model ends its answers itself
        # Random weights seldom emit their end token: here a token of the first prompt's answer
        # ends answers, one that another answer lacks and the middle two do not begin with, so
        # some rows end at it and others at their limits, and rows 1 and 2 go past 3 tokens.
        prompts = list(zip(backend.encode_batch(images()), QUESTIONS))
        free = [
            backend.generate(visual, question, n, stop_at_end=False)[0]
            for (visual, question), n in zip(prompts, LIMITS)
        ]
        backend.end_ids = {
            next(
                t
                for t in free[0][1:]
                if any(t not in ids for ids in free[1:]) and t not in free[1][:4] + free[2][:4]
            )
        }
    return backend


@pytest.fixture(scope="module")
def prompts(backend):
    return list(zip(backend.encode_batch(images()), QUESTIONS))


@pytest.fixture(scope="module")
def alone(backend, prompts):
    """What generate gives each prompt alone, with its limit. For the LLaVA family, whose LM
    takes nothing but embeddings, these are the tokens of transformers' own greedy generate
    (a dynamic cache) too."""
    answers = [backend.generate(v, question, n) for (v, question), n in zip(prompts, LIMITS)]
    if isinstance(backend.prompts, LlavaPrompts):
        for (visual, question), n, (ids, _) in zip(prompts, LIMITS, answers):
            embeds = backend.prompts.prompt(visual, question).embeds
            with torch.inference_mode():
                out = backend.lm.generate(
                    inputs_embeds=embeds,
                    max_new_tokens=n,
                    do_sample=False,
                    eos_token_id=sorted(backend.end_ids),
                    pad_token_id=backend.tokenizer.pad_token_id,
                )
            assert out[0].tolist() == ids
    return answers


def assert_same(got, expected):
    ids, maps = got
    expected_ids, expected_maps = expected
    assert ids == expected_ids
    assert maps.shape == expected_maps.shape
    torch.testing.assert_close(maps, expected_maps, atol=MAP_ATOL, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_each_row_gets_what_it_gets_alone_in_one_pass_per_token(backend, prompts, alone, rows):
    lengths = [len(ids) for ids, _ in alone]
    ended = [ids[-1] in backend.end_ids for ids, _ in alone]
    # Both ways to end are covered: a row at its end token before the longest row, one at its
    # limit; and the prompts have different lengths.
    assert any(end and n < max(lengths) for end, n in zip(ended, lengths))
    assert any(not end and n == limit for end, n, limit in zip(ended, lengths, LIMITS))
    assert len({backend.prompts.prompt(*p).embeds.shape[1] for p in prompts}) > 1
    streamed = [[] for _ in range(rows)]
    passes, handle = count_lm_passes(backend.lm)
    try:
        got = backend.generate_batch(
            prompts[:rows],
            LIMITS[:rows],
            [lambda ids, seen=seen: seen.append(list(ids)) for seen in streamed],
            [None] * rows,
        )
    finally:
        handle.remove()
    # One prefill and (longest answer - 1) steps, every pass with all rows (3 in a bucket of 4).
    assert passes == [batch_bucket(rows)] * max(lengths[:rows])
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
