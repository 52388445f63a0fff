"""Attend-and-segment: image + query -> Grounding (docs/method.md), ROS-free.

describe: the model answers the query greedily; every noun phrase of the
    answer gets a heat map, a point and a mask.
refer: the query is a referring expression, teacher-forced as the answer in
    one forward pass; the root token of its head noun phrase gives one mask.

ground_batch takes several requests (e.g. one per camera) in one step: their images in one
batched encoder call, every refer expression of them in one teacher-forced pass, every describe
answer of them decoded together, then each request's phrases on their own; each gets what it
would get alone.
"""

from __future__ import annotations

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
from groundlmm_ros.engine.refiners import Refiner, nms_keep
from groundlmm_ros.engine.step import Stages, Step, go_on
from groundlmm_ros.engine.types import (
    MODES,
    GroundedPhrase,
    Grounding,
    InputError,
    Request,
)

GCG_QUESTION = "Describe the image in detail."  # the paper's GCG prompt
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
    max_query_chars, max_new_tokens: limits (max_new_tokens can be lowered per call).
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
        max_query_chars: int = 1000,
        max_new_tokens: int = 512,
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
        self.max_query_chars = max_query_chars
        self.max_new_tokens = max_new_tokens
        self.min_score = min_score
        self.nms_iou = nms_iou
        self.seed = seed

    def warm_up(self, batch: int = 1) -> float:
        """Before the first query: the backend's decoder for describe answers of steps of up to
        `batch` requests (e.g. one per camera). -> the seconds it took."""
        return self.backend.warm_up(GCG_QUESTION, self.max_new_tokens, list(range(1, batch + 1)))

    def check(self, image, query, mode, max_new_tokens) -> None:
        """Raise InputError for anything the model must not see."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"image must be an (H, W, 3) RGB numpy array, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        if image.dtype != np.uint8:
            raise InputError(f"image must be uint8, got {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"image is empty: {image.shape}")
        if not isinstance(query, str) or not query.strip():
            raise InputError("query is empty")
        if len(query) > self.max_query_chars:
            raise InputError(
                f"query has {len(query)} characters, the limit is {self.max_query_chars}"
            )
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
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
        pass ends every request in it. Then each request on its own: the refiner embeds its
        image, its phrases are grounded."""
        step, visual = self._start(requests)
        refer = [i for i in step.live() if requests[i].mode == "refer"]
        maps = step.shared("teacher_force", refer, lambda: self._teacher_force(refer, visual, step))
        step.each(step.live(), lambda i: go_on(requests[i], "before its answer began"))
        describe = [i for i in step.live() if requests[i].mode == "describe"]
        answers = step.shared("generate", describe, lambda: self._generate(describe, visual, step))
        step.each(
            step.live(),
            lambda i: self._finish(step, i, visual[i], (maps or {}).get(i), (answers or {}).get(i)),
        )
        return step.results

    def _start(self, requests: list[Request]) -> tuple[Step, dict[int, object]]:
        """Checks every request, then encodes the images of those still on in one batched call.
        -> the step, and per live request index its encoded image."""
        step = Step(requests)

        def admit(i):
            request = requests[i]
            self.check(request.image, request.query, request.mode, request.max_new_tokens)
            if request.mode == "refer":
                step.answers[i] = self._expressions(request.query)
            go_on(request, "before the model ran")

        step.each(range(len(requests)), admit)
        live = step.live()
        if not live:
            return step, {}
        torch.manual_seed(self.seed)
        # First: on CUDA SAM embeds the first frame on its own stream while the model encodes and
        # decodes; the others' frames overlap their own phrase work (_finish).
        step.each(live[:1], lambda i: self._set_image(step, i))
        live = step.live()
        images = [requests[i].image for i in live]
        tokens = step.shared("encode", live, lambda: self.backend.encode_batch(images))
        return step, dict(zip(live, tokens or []))

    def _set_image(self, step: Step, i: int) -> None:
        with step.stages[i]("refine_image"):
            self.refiner.set_image(step.requests[i].image)
        step.embedded = i

    def _expressions(self, query: str) -> list[list[int]]:
        """The token ids of each referring expression of a refer query."""
        expressions = [e.strip() for e in query.split(EXPRESSION_SEPARATOR) if e.strip()]
        if not expressions:
            raise InputError(f"no referring expression in {query!r}")
        token_ids = [self.backend.encode_text(e) for e in expressions]
        if not all(token_ids):
            raise InputError(f"an expression of {query!r} has no tokens")
        return token_ids

    def _teacher_force(self, refer: list[int], visual: dict, step: Step) -> dict[int, list]:
        """Every expression of the refer requests `refer`, each with its own image, in one
        batched teacher-forced pass -> per request its expressions' maps."""
        sequences = [(visual[i], ids) for i in refer for ids in step.answers[i]]
        maps = iter(self.backend.teacher_force_batch(self.refer_question, sequences))
        return {i: [next(maps) for _ in step.answers[i]] for i in refer}

    def _generate(self, describe: list[int], visual: dict, step: Step) -> dict[int, tuple]:
        """The describe requests `describe`, each with its own image, answered together -> per
        request its answer (_answers); a request whose answer failed ends with its exception."""
        answers = self._answers([(visual[i], step.requests[i]) for i in describe])
        for i, answer in zip(describe, answers):
            if isinstance(answer, Exception):
                step.results[i] = answer
        return dict(zip(describe, answers))

    def _finish(self, step: Step, i: int, visual_tokens, refer_maps, answered) -> None:
        """Request i from its encoded image and its teacher-forced maps (refer) or its answer
        (describe) to a Grounding."""
        request, stage = step.requests[i], step.stages[i]
        if step.embedded != i:  # on CUDA SAM embeds it while the CPU finds this answer's phrases
            self._set_image(step, i)
        if request.mode == "describe":
            answer_ids, reads, answer, phrases = self._describe(answered, stage)
        else:
            answer_ids, reads, answer, phrases = self._refer(
                step.answers[i], refer_maps, request.on_token, stage
            )
        grid_shape = self.backend.grid_of(visual_tokens)
        image = request.image
        grounded = self._ground_phrases(image, phrases, reads, grid_shape, stage) if phrases else []
        step.results[i] = Grounding(
            request.query,
            request.mode,
            answer,
            list(answer_ids),
            grounded,
            image.shape[:2],
            stage.done(),
        )

    def _answers(self, jobs: list[tuple[object, Request]]) -> list[tuple | Exception]:
        """(encoded image, request) pairs -> per request its greedy answer to its query, within
        its limits and with its own on_token / should_stop, all decoded together: (its ids
        without the end token, their maps, the answer text, each token's character span in
        it), or the exception that ended it."""

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
        for outcome in generated:
            if isinstance(outcome, Exception):
                answers.append(outcome)
                continue
            ids, maps = outcome
            answer_ids = ids[:-1] if ids and ids[-1] in self.backend.end_ids else ids
            answers.append((answer_ids, maps, *token_spans(answer_ids, self.backend.decode)))
        return answers

    def _describe(self, answered: tuple, stage: Stages):
        """Every noun chunk of the generated answer with tokens is a phrase."""
        answer_ids, maps, answer, spans = answered
        with stage("phrases"):
            phrases = [p for p in noun_phrases(answer, spans, self.nlp) if p.token_indices]
        return answer_ids, [(maps, 0)] * len(phrases), answer, phrases

    def _refer(self, token_ids, maps, on_token, stage):
        """Each expression of the query (split at EXPRESSION_SEPARATOR), teacher-forced as the
        answer to refer_question, is one phrase; all of them in one batched forward pass, each
        read (and normalised) as if alone. The answer is the expressions joined by "; ", the
        token ids theirs one after another."""
        with stage("phrases"):
            texts, phrases, reads, answer_ids = [], [], [], []
            for ids, expression_maps in zip(token_ids, maps):
                text, spans = token_spans(ids, self.backend.decode)
                phrase = referred_phrase(text, spans, self.nlp)
                start, first = len("; ".join(texts + [""])) if texts else 0, len(answer_ids)
                phrases.append(
                    Phrase(
                        phrase.text,
                        start + phrase.char_start,
                        start + phrase.char_end,
                        [first + t for t in phrase.token_indices],
                    )
                )
                reads.append((expression_maps, first))
                texts.append(text)
                answer_ids += ids
        answer = "; ".join(texts)
        if on_token is not None:
            on_token(answer, len(answer_ids))
        return answer_ids, reads, answer, phrases

    def _ground_phrases(
        self,
        image: np.ndarray,
        phrases: list[Phrase],
        reads: list[tuple[torch.Tensor, int]],
        grid_shape: tuple[int, int],
        stage: Stages,
    ) -> list[GroundedPhrase]:
        """Per phrase, reads[i] = (the maps (T, h * w) it reads on this image's (h, w) grid, index
        of their first token in the answer) -> its heat map, point and mask."""
        height, width = image.shape[:2]
        with stage("heatmaps"):
            grids = {
                id(maps): self._token_grid(maps, grid_shape) for maps, _ in reads
            }  # each answer's, once
            # One phrase at a time: the padded square of a large image is big (a 4K frame: 59 MB).
            heatmaps = [
                heatmap.upsample(
                    heatmap.combine(
                        grids[id(maps)], [t - first for t in p.token_indices], self.combine
                    )[None],
                    (height, width),
                    self.upsample,
                )[0]
                for p, (maps, first) in zip(phrases, reads)
            ]  # P x (H, W)
            points = [heatmap.argmax_point(h) for h in heatmaps]
        with stage("refine"):
            refined = [self.refiner.refine(h, p) for h, p in zip(heatmaps, points)]
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

    def _token_grid(self, maps: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
        """maps (T, h * w) -> (T, h, w) on the image's grid, mean map subtracted when
        normalising."""
        grid = maps.float().cpu().reshape(-1, *grid_shape)
        if self.normalise and len(grid) > 1:  # one token's map minus itself would be all zeros
            grid = heatmap.normalise(grid)
        return grid

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

    def ground_answer_span(
        self,
        image: np.ndarray,
        question: str,
        token_count: int = 8,
        combine: str = "max",
        *,
        max_new_tokens: int | None = None,
    ) -> Grounding:
        """The reference's RES recipe (groundLMM aas/infer_attn_res.py, aas/res.py): answer the
        question greedily, merge the first `token_count` generated tokens' maps (mean-map subtracted
        over all generated steps, the end token's included as in the reference; upsampled to image
        pixels) and refine the argmax point. Returns a Grounding with that one phrase: the answer
        text its tokens cover; a token index equal to len(token_ids) is the end token's map (short
        answers)."""
        if not (isinstance(token_count, int) and token_count >= 1):
            raise InputError(f"token_count must be a positive integer, got {token_count!r}")
        request = Request(image, question, max_new_tokens=max_new_tokens)
        step, visual = self._start([request])
        if step.results[0] is not None:
            raise step.results[0]
        visual_tokens = visual[0]
        (answered,) = self._answers([(visual_tokens, request)])
        if isinstance(answered, Exception):
            raise answered
        answer_ids, maps, answer, spans = answered
        grid = self._token_grid(maps, self.backend.grid_of(visual_tokens))
        tokens = list(range(min(token_count, len(grid))))
        height, width = image.shape[:2]
        # Upsampled first, then combined, as aas/res.py does: bicubic upsampling and max do not
        # commute.
        upsampled = torch.from_numpy(heatmap.upsample(grid[tokens], (height, width), self.upsample))
        heat = heatmap.combine(upsampled, range(len(tokens)), combine).numpy()
        point = heatmap.argmax_point(heat)
        mask, score = self.refiner.refine(heat, point)
        end = spans[min(len(tokens), len(spans)) - 1][1] if spans else 0
        phrase = GroundedPhrase(
            answer[:end], 0, end, tokens, heat, point, mask, score, mask_bbox(mask)
        )
        return Grounding(question, "describe", answer, list(answer_ids), [phrase], (height, width))
