"""The query check at the tokenizer boundary, on the shipped demo model's tokenizer (a small
word-level vocabulary) and the tiny LLaVA's (byte fallback): special tokens, unknown words,
byte-fallback pieces, a lone separator, whitespace and zero-width characters. Every query either
grounds or is refused with InputError and its reason before the model runs; none reaches the
model as no text (which used to fail there with "a phrase needs at least one token")."""

import pytest
from images import random_rgb

from groundlmm_ros.engine.query import query_problem
from groundlmm_ros.engine.types import Grounding, InputError
from groundlmm_ros.models.presets import build_engine

MODELS = ("demo", "tiny-random")
# (query, refused in refer mode, refused in describe mode), on both tokenizers
ALWAYS_REFUSED = {
    "</s>": "decodes to no text",
    "<s>": "decodes to no text",
    "<unk>": "decodes to no text",
    "<s></s><pad>": "decodes to no text",
    " \t\n": "empty query",
    "\u3000": "empty query",
    "\u200b": "empty query",
    "\u200b\u200c\u200d\ufeff\u2060": "empty query",
    "\x07": "control character U+0007",
}
REFER_REFUSED = {
    ";": "no referring expression",
    " ; ;; ": "no referring expression",
    "the mug; </s>": "referring expression 2 of 'the mug; </s>', '</s>', decodes to no text",
    "</s>; the mug": "referring expression 1",
}
# Odd but readable on at least one tokenizer: grounded there, or refused with a reason.
ODD = [
    "the mug",
    "the\u200bmug",
    "🙂",
    "the 🙂 cup",
    "\u0301",
    "<0xE2>",
    "<image>",
    "a;b",
    "the mug </s> on the left",
    "é" * 30,
]


@pytest.fixture(scope="module", params=MODELS)
def engine(request):
    return build_engine(request.param, max_new_tokens=4)


def ground(engine, query: str, mode: str):
    """Its Grounding or the InputError that refused it; any other exception fails the test."""
    try:
        return engine.ground(random_rgb(32, 40), query, mode)
    except InputError as error:
        return error


@pytest.mark.parametrize("mode", ["refer", "describe"])
@pytest.mark.parametrize("query", list(ALWAYS_REFUSED))
def test_special_tokens_and_invisible_text_are_refused_with_the_reason(engine, query, mode):
    answer = ground(engine, query, mode)
    assert isinstance(answer, InputError) and ALWAYS_REFUSED[query] in str(answer), answer


@pytest.mark.parametrize("query", list(REFER_REFUSED))
def test_one_unreadable_expression_refuses_the_whole_refer_query(engine, query):
    answer = ground(engine, query, "refer")
    assert isinstance(answer, InputError) and REFER_REFUSED[query] in str(answer), answer


@pytest.mark.parametrize("mode", ["refer", "describe"])
@pytest.mark.parametrize("query", ODD)
def test_odd_text_grounds_or_is_refused_before_the_model(engine, query, mode):
    answer = ground(engine, query, mode)
    if isinstance(answer, InputError):
        assert str(answer), "refused without a reason"
    else:
        assert isinstance(answer, Grounding) and answer.query == query
        if mode == "refer":
            assert all(phrase.token_indices for phrase in answer.phrases)


def test_an_unknown_word_of_the_demo_vocabulary_is_refused_as_no_text():
    """The demo model knows only its scenes' words: "mug" is <unk> to it."""
    engine = build_engine("demo", max_new_tokens=4)
    answer = ground(engine, "mug", "refer")
    assert isinstance(answer, InputError) and "'mug', decodes to no text" in str(answer)


def test_the_text_check_names_the_limit():
    assert query_problem("x" * 11, "refer", 10) == (
        "query has 11 characters, more than max_query_length=10"
    )
    assert query_problem("the cup", "point", 10).startswith("unknown mode 'point'")
    assert query_problem("\ufeff ", "refer", 10) == "empty query (no visible character)"
    assert query_problem("the\u200bcup", "refer", 10) == ""
