"""The engine's Backend (engine/backend.py) for the models here, built from parts.

A prompt builder (PromptBuilder) turns an image into visual tokens and a question into a
prompt, one row of embeddings, positions and image columns (models/decoder.py: Prompt); the
LM (a transformers causal LM on `inputs_embeds`, its text attention on the recorder) and its
tokenizer answer; the one decoder (models/decoder.py) runs greedy generation (describe) or
one teacher-forced prefill (refer), for one prompt or a batch.

The prompt builders: LlavaPrompts (models/llava_prompts.py: LLaVA-1.5, DiffLMM) and
ChatTemplatePrompts with its family's image layout (models/chat_backend.py: Qwen2.5-VL,
LLaVA-NeXT, InternVL).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import torch

from groundlmm_ros.models.decoder import Decoder, Prompt, Row
from groundlmm_ros.models.recorder import RECORDING_ATTENTION

# What warm_up encodes: a blank frame of a common camera size (the LLaVA family's prompt does not
# depend on it; a chat model's image-token count does).
WARM_UP_FRAME = (480, 640)


class PromptBuilder(Protocol):
    """A model family's images and prompts, what a Backend is built around."""

    pads_to_square: bool  # preprocessing pads to a square (heat maps undo it)

    def encode_batch(self, images: list[np.ndarray]) -> list[Any]:
        """(H, W, 3) uint8 RGB images -> per image its visual tokens (the family's own object)."""

    def grid_of(self, visual_tokens: Any) -> tuple[int, int]:
        """(rows, columns) of this image's maps."""

    def prompt(self, visual_tokens: Any, question: str, answer_ids: list[int] = ()) -> Prompt:
        """One row: the prompt's embeddings (answer ids appended), positions, image columns."""


class Backend:
    """The engine's Backend protocol, composed: a prompt builder, the LM (its text attention
    switched to the recording SDPA), the tokenizer, the end tokens and the one decoder.

    text_attention: what set_attn_implementation gets (the whole LM, or {"text_config": ...}
    for multimodal wrappers whose vision tower keeps its own attention). compile, graphs: the
    decoder's (models/decoder.py: its per-token step under torch.compile, CUDA graphs)."""

    def __init__(
        self,
        lm,
        tokenizer,
        prompts: PromptBuilder,
        *,
        end_ids: set[int],
        text_attention=RECORDING_ATTENTION,
        compile: bool = False,
        graphs: bool | None = None,
    ):
        self.lm = lm.eval()
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.end_ids = set(end_ids)
        self.lm.set_attn_implementation(text_attention)
        self.decoder = Decoder(self.lm, compile=compile, graphs=graphs)

    @property
    def pads_to_square(self) -> bool:
        return self.prompts.pads_to_square

    # -- images and text ---------------------------------------------------------------------

    def encode_batch(self, images: list[np.ndarray]) -> list:
        return self.prompts.encode_batch(images)

    def encode(self, image: np.ndarray):
        return self.encode_batch([image])[0]

    def grid_of(self, visual_tokens) -> tuple[int, int]:
        return self.prompts.grid_of(visual_tokens)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- answers -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_batch(
        self, prompts, max_new_tokens, on_token, should_stop, stop_at_end=True
    ) -> list[tuple[list[int], torch.Tensor] | Exception]:
        """Per (visual tokens, question) what it gets decoded alone with its own limit, on_token
        and should_stop: (ids, maps (T, rows * columns)), or the exception that ended it
        (Cancelled, what its on_token raised, a question the template refuses, or a failed
        forward pass, which ends every row). All rows decode together, one pass per token."""
        if not len(prompts) == len(max_new_tokens) == len(on_token) == len(should_stop):
            raise ValueError("generate_batch needs one limit, on_token and should_stop per prompt")
        results: list = [None] * len(prompts)
        built, rows = {}, {}
        for i, (visual, question) in enumerate(prompts):
            try:
                built[i] = self.prompts.prompt(visual, question)
            except Exception as error:  # this row's result
                results[i] = error
            else:
                rows[i] = Row(max_new_tokens[i], on_token[i], should_stop[i])
        if built:
            try:
                self.decoder.generate(
                    list(built.values()), list(rows.values()), self.end_ids, stop_at_end
                )
            except Exception as error:  # a failed pass ends every row of it
                return [error if result is None else result for result in results]
        for i, row in rows.items():
            results[i] = row.ended if isinstance(row.ended, Exception) else (row.ids, row.maps)
        return results

    def generate(
        self,
        visual_tokens,
        question,
        max_new_tokens,
        on_token=None,
        should_stop=None,
        stop_at_end=True,
    ):
        """generate_batch of one: (ids, maps), or raises what ended it."""
        (result,) = self.generate_batch(
            [(visual_tokens, question)], [max_new_tokens], [on_token], [should_stop], stop_at_end
        )
        if isinstance(result, Exception):
            raise result
        return result

    @torch.inference_mode()
    def teacher_force_batch(self, question, sequences) -> list[torch.Tensor]:
        """sequences: (visual tokens, answer ids) pairs, one image each (the same image or
        not), in ONE teacher-forced pass: per pair its maps (T, rows * columns), position t - 1
        for token t, as generation reads them."""
        answers = [list(ids) for _, ids in sequences]
        if not answers or not all(answers):
            raise ValueError("teacher forcing needs at least one answer token per answer")
        prompts = [
            self.prompts.prompt(visual, question, ids[:-1])
            for (visual, _), ids in zip(sequences, answers)
        ]
        return self.decoder.teacher_force(prompts, [len(ids) for ids in answers])

    def teacher_force(self, visual_tokens, question, answer_ids) -> torch.Tensor:
        return self.teacher_force_batch(question, [(visual_tokens, answer_ids)])[0]

    def warm_up(self, question: str, max_new_tokens: int, batch_sizes: list[int]) -> float:
        """Prepares the decoder's buckets for answers to `question` in batches of `batch_sizes`
        rows (captures CUDA graphs, compiles), on a blank frame. -> the seconds it took. An
        eager decoder has nothing to prepare: its buffers cost nothing to build on first use,
        and the model stays unrun until the first query."""
        if not (self.decoder.graphs or self.decoder.compile):
            return 0.0
        start = time.perf_counter()
        blank = np.zeros((*WARM_UP_FRAME, 3), dtype=np.uint8)
        with torch.inference_mode():
            prompt = self.prompts.prompt(self.encode(blank), question)
        self.decoder.warm_up(prompt, batch_sizes, max_new_tokens)
        return time.perf_counter() - start
