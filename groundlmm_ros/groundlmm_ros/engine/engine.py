"""Attend-and-segment: image + query -> Grounding (docs/method.md), ROS-free.

describe: the model answers the query greedily; every noun phrase of the
    answer gets a heat map, a point and a mask.
refer: the query is a referring expression, teacher-forced as the answer in
    one forward pass; the root token of its head noun phrase gives one mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

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
from groundlmm_ros.engine.types import MODES, Cancelled, GroundedPhrase, Grounding, InputError

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


class Stages:
    """Seconds per named stage of one query (`with stage("encode"): ...`), plus "total"."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def done(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


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
    seed: torch's global seed, reset before every query so stochastic encoders repeat.
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

    def warm_up(self) -> None:
        """Before the first query: the backend's fixed-shape decoders for a describe answer."""
        self.backend.warm_up(GCG_QUESTION, self.max_new_tokens)

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
        self.check(image, query, mode, max_new_tokens)
        stage = Stages()
        if should_stop is not None and should_stop():
            raise Cancelled("stopped before the model ran")
        torch.manual_seed(self.seed)
        with stage(
            "refine_image"
        ):  # first: on CUDA SAM embeds the frame on its own stream meanwhile
            self.refiner.set_image(image)
        with stage("encode"):
            visual_tokens = self.backend.encode(image)
        if mode == "describe":
            limit = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
            answer_ids, reads, answer, phrases = self._describe(
                visual_tokens, query.strip(), limit, on_token, should_stop, stage
            )
        else:
            answer_ids, reads, answer, phrases = self._refer(visual_tokens, query, on_token, stage)
        grid_shape = self.backend.grid_of(visual_tokens)
        grounded = self._ground_phrases(image, phrases, reads, grid_shape, stage) if phrases else []
        return Grounding(
            query, mode, answer, list(answer_ids), grounded, image.shape[:2], stage.done()
        )

    def _describe(self, visual_tokens, question, max_new_tokens, on_token, should_stop, stage):
        """The model answers greedily; every noun chunk of the answer with tokens is a phrase."""

        def tokens_arrived(ids):
            if on_token is not None:
                on_token(self.backend.decode(ids), len(ids))

        with stage("generate"):
            ids, maps = self.backend.generate(
                visual_tokens, question, max_new_tokens, tokens_arrived, should_stop
            )
        answer_ids = ids[:-1] if ids and ids[-1] in self.backend.end_ids else ids
        with stage("phrases"):
            answer, spans = token_spans(answer_ids, self.backend.decode)
            phrases = [p for p in noun_phrases(answer, spans, self.nlp) if p.token_indices]
        return answer_ids, [(maps, 0)] * len(phrases), answer, phrases

    def _refer(self, visual_tokens, query, on_token, stage):
        """Each expression of the query (split at EXPRESSION_SEPARATOR), teacher-forced as the
        answer to refer_question, is one phrase; all of them in one batched forward pass, each
        read (and normalised) as if alone. The answer is the expressions joined by "; ", the
        token ids theirs one after another."""
        expressions = [e.strip() for e in query.split(EXPRESSION_SEPARATOR) if e.strip()]
        if not expressions:
            raise InputError(f"no referring expression in {query!r}")
        token_ids = [self.backend.encode_text(e) for e in expressions]
        if not all(token_ids):
            raise InputError(f"an expression of {query!r} has no tokens")
        with stage("teacher_force"):
            maps = self.backend.teacher_force_batch(visual_tokens, self.refer_question, token_ids)
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
        self.check(image, question, "describe", max_new_tokens)
        if not (isinstance(token_count, int) and token_count >= 1):
            raise InputError(f"token_count must be a positive integer, got {token_count!r}")
        torch.manual_seed(self.seed)
        self.refiner.set_image(image)  # first, as in ground()
        visual_tokens = self.backend.encode(image)
        limit = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        ids, maps = self.backend.generate(visual_tokens, question.strip(), limit)
        answer_ids = ids[:-1] if ids and ids[-1] in self.backend.end_ids else ids
        answer, spans = token_spans(answer_ids, self.backend.decode)
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
