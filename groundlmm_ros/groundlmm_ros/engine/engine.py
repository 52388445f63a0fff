"""Attend-and-segment: image + query -> Grounding (docs/method.md), ROS-free.

describe: the model answers the query greedily; every noun phrase of the
    answer gets a heat map, a point and a mask.
refer: the query is a referring expression, teacher-forced as the answer in
    one forward pass; the root token of its head noun phrase gives one mask.

ground_batch takes several requests (e.g. one per camera) in one step: their images in one
batched encoder call, every refer expression of them in one teacher-forced pass, every describe
answer of them decoded together, their frames in one refiner call, then each request's phrases
on their own; each gets what it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from groundlmm_ros.engine import heatmap
from groundlmm_ros.engine.backend import Backend
from groundlmm_ros.engine.phrases import (
    DEFAULT_SPACY,
    Phrase,
    load_spacy,
    noun_phrases,
    referred_phrase,
    token_spans,
)
from groundlmm_ros.engine.query import query_problem
from groundlmm_ros.engine.refiners import Refiner, nms_keep
from groundlmm_ros.engine.step import Stages, Step, raise_if_stopped
from groundlmm_ros.engine.types import (
    MAX_NEW_TOKENS,
    Answer,
    GroundedPhrase,
    Grounding,
    InputError,
    Request,
)

# The paper's GCG prompt.
GCG_QUESTION = "Describe the image in detail."
# Separates the referring expressions of one refer query ("the red mug; the blue bowl"):
# they are grounded together in one batched pass, one phrase (and mask) each.
EXPRESSION_SEPARATOR = ";"


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, width, height) tight box of a (H, W) bool mask; zeros if empty."""
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (
        int(columns.min()),
        int(rows.min()),
        int(columns.max() - columns.min() + 1),
        int(rows.max() - rows.min() + 1),
    )


class Engine:
    """One model backend + one refiner. Options (all keyword):

    spacy_model: spaCy pipeline for noun chunks.
    combine: "max" (the paper's GCG) | "mean" | "first", how a phrase's token maps merge.
    upsample: "pad" | "resize" (default: "pad" when the backend pads to square).
    normalise: subtract the answer's mean map (the paper; a toy model may turn it off).
    refer_question: the user turn that the referring expression answers in refer mode.
    max_query_length, max_new_tokens: limits (max_new_tokens can be lowered per call).
    min_score: drop phrases whose refiner score is below it (reference demo: 0.85); None = keep all.
    nms_iou: drop a phrase whose mask overlaps a better-scoring one by IoU above it (demo: 0.75).
    seed: torch's global seed, reset before every step's encoder call so stochastic encoders
        repeat (one that draws for a batch shares its draws, as DiffLMM's does, so an image
        gets the same tokens alone or batched).
    """

    def __init__(
        self,
        backend: Backend,
        refiner: Refiner,
        *,
        spacy_model: str = DEFAULT_SPACY,
        combine: str = heatmap.DEFAULT_COMBINE,
        upsample: str | None = None,
        normalise: bool = True,
        refer_question: str = GCG_QUESTION,
        max_query_length: int = 1000,
        max_new_tokens: int = MAX_NEW_TOKENS,
        min_score: float | None = None,
        nms_iou: float | None = None,
        seed: int = 0,
    ):
        if combine not in heatmap.COMBINE:
            raise ValueError(f"combine must be one of {heatmap.COMBINE}, got {combine!r}")
        upsample = upsample or ("pad" if backend.pads_to_square else "resize")
        if upsample not in heatmap.UPSAMPLE:
            raise ValueError(f"upsample must be one of {heatmap.UPSAMPLE}, got {upsample!r}")
        self.backend = backend
        self.refiner = refiner
        self.nlp = load_spacy(spacy_model)
        self.combine = combine
        self.upsample = upsample
        self.normalise = normalise
        self.refer_question = refer_question
        self.max_query_length = max_query_length
        self.max_new_tokens = max_new_tokens
        self.min_score = min_score
        self.nms_iou = nms_iou
        self.seed = seed

    def warm_up(self, batch: int = 1) -> float:
        """Before the first query: the backend's decoder for describe answers of steps of up to
        `batch` requests (e.g. one per camera), and the refiner's encoder for steps of up to
        `batch` frames. -> the seconds it took."""
        start = time.perf_counter()
        self.backend.warm_up(GCG_QUESTION, self.max_new_tokens, list(range(1, batch + 1)))
        self.refiner.warm_up(batch)
        return time.perf_counter() - start

    def check(self, image, query, mode, max_new_tokens) -> None:
        """Raise InputError for anything the model must not see: a bad image, a query that
        query_problem refuses, a bad max_new_tokens. What the query tokenizes to is checked
        next, by tokenize."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"image must be an (H, W, 3) RGB numpy array, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        if image.dtype != np.uint8:
            raise InputError(f"image must be uint8, got {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"image is empty: {image.shape}")
        problem = query_problem(query, mode, self.max_query_length)
        if problem:
            raise InputError(problem)
        if max_new_tokens is not None and not (
            isinstance(max_new_tokens, int) and max_new_tokens >= 1
        ):
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")

    def ground(
        self,
        image: np.ndarray,
        query: str,
        mode: str = "describe",
        *,
        on_token: Callable[[str, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_new_tokens: int | None = None,
    ) -> Grounding:
        """image: (H, W, 3) uint8 RGB. on_token(partial_answer, n_tokens) as tokens arrive;
        should_stop() between tokens raises Cancelled."""
        (result,) = self.ground_batch(
            [Request(image, query, mode, on_token, should_stop, max_new_tokens)]
        )
        if isinstance(result, Exception):
            raise result
        return result

    def ground_batch(self, requests: list[Request]) -> list[Grounding | Exception]:
        """One result per request, in order: its Grounding, or the exception that ended it
        (InputError for bad input, Cancelled when its should_stop said so, any other Exception
        from the model for that request). Never raises for one request's failure.

        The images are encoded in one batched call, every expression of every refer request
        is teacher-forced in one batched pass, and the describe answers are decoded together
        (backend.generate_batch: one forward pass per token for all of them where the model
        allows), each with its own limit, on_token and should_stop; an exception of a shared
        pass ends every request in it. Then the refiner embeds the frames of those still on in
        one call, and each request's phrases are grounded on their own."""
        step, visual = self._check_and_encode(requests)
        refer = [i for i in step.live() if requests[i].mode == "refer"]
        maps = step.shared("teacher_force", refer, lambda: self._teacher_force(refer, visual, step))
        step.each(step.live(), lambda i: raise_if_stopped(requests[i], "before its answer began"))
        describe = [i for i in step.live() if requests[i].mode == "describe"]
        answers = step.shared("generate", describe, lambda: self._generate(describe, visual, step))
        step.embedded = step.live()
        frames = [requests[i].image for i in step.embedded]
        step.shared("refine_image", step.embedded, lambda: self.refiner.set_images(frames))
        step.each(
            step.live(),
            lambda i: self._finish(step, i, visual[i], (maps or {}).get(i), (answers or {}).get(i)),
        )
        return step.results

    def answer(
        self, image: np.ndarray, question: str, *, max_new_tokens: int | None = None
    ) -> Answer:
        """The greedy answer to a question about the image, as describe mode makes it, without
        its phrases: for recipes that read its maps themselves (paper_eval/res.py)."""
        request = Request(image, question, max_new_tokens=max_new_tokens)
        step, visual = self._check_and_encode([request])
        if step.results[0] is not None:
            raise step.results[0]
        (answer,) = self._answers([(visual[0], request)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _check_and_encode(self, requests: list[Request]) -> tuple[Step, dict[int, object]]:
        """Checks every request, then encodes the images of those still on in one batched call.
        -> the step, and per live request index its encoded image."""
        step = Step(requests)

        def admit(i):
            request = requests[i]
            self.check(request.image, request.query, request.mode, request.max_new_tokens)
            if request.mode == "refer":
                step.expressions[i] = self._expressions(request.query)
            else:
                self._check_question(request.query)
            raise_if_stopped(request, "before the model ran")

        step.each(range(len(requests)), admit)
        live = step.live()
        if not live:
            return step, {}
        torch.manual_seed(self.seed)
        images = [requests[i].image for i in live]
        tokens = step.shared("encode", live, lambda: self.backend.encode_batch(images))
        return step, dict(zip(live, tokens or []))

    def _unreadable(self, ids: list[int]) -> str:
        """Why the model has none of these token ids to read ('' if it has): there are none, or
        they decode to no text (only special tokens such as `</s>`, `<unk>`)."""
        if not ids:
            return "tokenizes to nothing"
        if not self.backend.decode(ids).strip():
            return "decodes to no text (only special or unknown tokens)"
        return ""

    def _check_question(self, query: str) -> None:
        """InputError for a describe question the model cannot read (_unreadable)."""
        problem = self._unreadable(self.backend.encode_text(query.strip()))
        if problem:
            raise InputError(f"query {query!r} {problem}")

    def _expressions(self, query: str) -> list[list[int]]:
        """The token ids of each referring expression of a refer query. One expression that gives
        the model no token to read (_unreadable, or no token under its phrase) refuses the whole
        query with InputError naming it: a result's phrases are its expressions, in order, and
        one left out silently would look like a failed grounding."""
        expressions = [e.strip() for e in query.split(EXPRESSION_SEPARATOR) if e.strip()]
        if not expressions:
            raise InputError(f"no referring expression in {query!r}")
        token_ids = [self.backend.encode_text(e) for e in expressions]
        for number, (expression, ids) in enumerate(zip(expressions, token_ids), 1):
            problem = self._unreadable(ids)
            phrase = (
                None
                if problem
                else referred_phrase(*token_spans(ids, self.backend.decode), self.nlp)
            )
            if phrase is not None and not phrase.token_indices:
                problem = "has no token that decodes to a character"
            if problem:
                raise InputError(
                    f"referring expression {number} of {query!r}, {expression!r}, {problem}"
                )
        return token_ids

    def _teacher_force(self, refer: list[int], visual: dict, step: Step) -> dict[int, list]:
        """Every expression of the refer requests `refer`, each with its own image, in one
        batched teacher-forced pass -> per request its expressions' maps."""
        sequences = [(visual[i], ids) for i in refer for ids in step.expressions[i]]
        maps = iter(self.backend.teacher_force_batch(self.refer_question, sequences))
        return {i: [next(maps) for _ in step.expressions[i]] for i in refer}

    def _generate(self, describe: list[int], visual: dict, step: Step) -> dict[int, Answer]:
        """The describe requests `describe`, each with its own image, answered together -> per
        request its Answer; a request whose answer failed ends with its exception."""
        answers = self._answers([(visual[i], step.requests[i]) for i in describe])
        for i, answer in zip(describe, answers):
            if isinstance(answer, Exception):
                step.results[i] = answer
        return dict(zip(describe, answers))

    def _finish(self, step: Step, i: int, visual_tokens, refer_maps, answer) -> None:
        """Request i from its encoded image and its teacher-forced maps (refer) or its Answer
        (describe) to a Grounding."""
        request, stage = step.requests[i], step.stages[i]
        if request.mode == "describe":
            phrases, segments = self._describe(answer, stage)
        else:
            grid = self.backend.grid_of(visual_tokens)
            answer, phrases, segments = self._refer(
                step.expressions[i], refer_maps, grid, request.on_token, stage
            )
        grounded = []
        if phrases:
            grounded = self._ground_phrases(
                request.image, step.embedded.index(i), answer, phrases, segments, stage
            )
        step.results[i] = Grounding(
            request.query,
            request.mode,
            answer.text,
            list(answer.token_ids),
            grounded,
            request.image.shape[:2],
            stage.timings(),
        )

    def _answers(self, jobs: list[tuple[object, Request]]) -> list[Answer | Exception]:
        """(encoded image, request) pairs -> per request its greedy Answer to its query, within
        its limits and with its own on_token / should_stop, all decoded together, or the
        exception that ended it."""

        def streamer(on_token):
            if on_token is None:
                return None
            return lambda ids: on_token(self.backend.decode(ids), len(ids))

        generated = self.backend.generate_batch(
            [(visual, request.query.strip()) for visual, request in jobs],
            [
                min(request.max_new_tokens or self.max_new_tokens, self.max_new_tokens)
                for _, request in jobs
            ],
            [streamer(request.on_token) for _, request in jobs],
            [request.should_stop for _, request in jobs],
        )
        answers = []
        for (visual, _), outcome in zip(jobs, generated):
            if isinstance(outcome, Exception):
                answers.append(outcome)
                continue
            ids, maps = outcome
            token_ids = ids[:-1] if ids and ids[-1] in self.backend.end_ids else ids
            text, spans = token_spans(token_ids, self.backend.decode)
            answers.append(Answer(token_ids, text, spans, maps, self.backend.grid_of(visual)))
        return answers

    def _describe(self, answer: Answer, stage: Stages):
        """Every noun chunk of the generated answer with tokens is a phrase, read on all of the
        answer's maps -> (phrases, each one's (first, end) rows of answer.maps)."""
        with stage("phrases"):
            phrases = [
                p for p in noun_phrases(answer.text, answer.spans, self.nlp) if p.token_indices
            ]
        return phrases, [(0, len(answer.maps))] * len(phrases)

    def _refer(self, token_ids, maps, grid, on_token, stage):
        """Each expression of the query (split at EXPRESSION_SEPARATOR), teacher-forced as the
        answer to refer_question, is one phrase; all of them in one batched forward pass, each
        read (and normalised) as if alone. -> (the Answer: the expressions joined by "; ", their
        token ids and maps one after another; the phrases; each one's (first, end) rows of
        the answer's maps: its own expression's)."""
        with stage("phrases"):
            texts, phrases, segments, answer_ids, spans = [], [], [], [], []
            for ids in token_ids:
                text, expression_spans = token_spans(ids, self.backend.decode)
                phrase = referred_phrase(text, expression_spans, self.nlp)
                start, first = len("; ".join(texts + [""])) if texts else 0, len(answer_ids)
                phrases.append(
                    Phrase(
                        phrase.text,
                        start + phrase.char_start,
                        start + phrase.char_end,
                        [first + t for t in phrase.token_indices],
                    )
                )
                segments.append((first, first + len(ids)))
                spans += [(start + s, start + e) for s, e in expression_spans]
                texts.append(text)
                answer_ids += ids
        answer = Answer(answer_ids, "; ".join(texts), spans, torch.cat(maps), grid)
        if on_token is not None:
            on_token(answer.text, len(answer_ids))
        return answer, phrases, segments

    def _ground_phrases(
        self,
        image: np.ndarray,
        frame: int,
        answer: Answer,
        phrases: list[Phrase],
        segments: list[tuple[int, int]],
        stage: Stages,
    ) -> list[GroundedPhrase]:
        """The phrases of one answer on its image, frame `frame` of the refiner's -> each one's
        heat map, point and mask, filtered."""
        heatmaps, points = self._heatmaps(image, answer, phrases, segments, stage)
        with stage("refine"):
            refined = self.refiner.refine(frame, heatmaps, points)
        grounded = [
            GroundedPhrase(
                phrase.text,
                phrase.char_start,
                phrase.char_end,
                phrase.token_indices,
                heat,
                point,
                mask,
                score,
                mask_bbox(mask),
            )
            for phrase, heat, point, (mask, score) in zip(phrases, heatmaps, points, refined)
        ]
        return self._filter(grounded)

    def _heatmaps(
        self,
        image: np.ndarray,
        answer: Answer,
        phrases: list[Phrase],
        segments: list[tuple[int, int]],
        stage: Stages,
    ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Per phrase, read on the rows segments[i] = (first, end) of the answer's maps
        (normalised over those rows) -> its heat map in image pixels and its point. The maps
        stay on the model's device until the points; the heat maps then come to the CPU."""
        height, width = image.shape[:2]
        with stage("heatmaps"):
            # Each segment's grid once: a describe answer's phrases share one.
            grids = {
                segment: self.token_maps(answer.maps[slice(*segment)], answer.grid)
                for segment in set(segments)
            }
            heatmaps, points = [], []
            # One phrase at a time: the padded square of a large image is big (a 4K frame: 59 MB).
            for phrase, (first, end) in zip(phrases, segments):
                tokens = [t - first for t in phrase.token_indices]
                combined = heatmap.combine(grids[first, end], tokens, self.combine)
                heat = heatmap.upsample(combined[None], (height, width), self.upsample)[0]
                points.append(heatmap.argmax_point(heat))
                heatmaps.append(heat.cpu().numpy())
        return heatmaps, points

    def token_maps(self, maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """maps (T, rows * columns) -> (T, rows, columns) float32 on the image's grid, on their
        device, mean map subtracted when normalising."""
        token_grid = maps.float().reshape(-1, *grid)
        # One token's map minus itself would be all zeros.
        if self.normalise and len(token_grid) > 1:
            token_grid = heatmap.normalise(token_grid)
        return token_grid

    def _filter(self, phrases: list[GroundedPhrase]) -> list[GroundedPhrase]:
        """The reference demo's optional filters: refiner score, then NMS by mask IoU."""
        if self.min_score is not None:
            phrases = [p for p in phrases if p.score >= self.min_score]
        if self.nms_iou is not None and len(phrases) > 1:
            keep = nms_keep(
                np.stack([p.mask for p in phrases]),
                np.array([p.score for p in phrases]),
                self.nms_iou,
            )
            phrases = [phrases[i] for i in keep]
        return phrases
