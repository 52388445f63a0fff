"""The engine's Backend (engine/backend.py) for LLaVA-style models, and the parts they share.

A backend turns an image into visual tokens (N_image x hidden embeddings laid
out on a grid, e.g. 24x24), splices them into the LLaVA v1 prompt in place of
"<image>", and runs a transformers causal LM on `inputs_embeds` with the
attention recorder on: greedy generation (describe) or one teacher-forced pass
(refer). A new model subclasses LlavaStyleBackend and supplies only
`encode_image` (pixel_values -> visual tokens) plus its LM and tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlmm_ros.engine.recorder import RECORDING_ATTENTION, Recorder
from groundlmm_ros.engine.types import InputError
from groundlmm_ros.models.static_decode import StaticDecoder, cache_length, take_token

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's conversation templates for one user turn (llava/conversation.py in LLaVA and in the
# reference code): roles "USER"/"ASSISTANT", separators " " and "</s>"; only the system line
# differs.
# Vicuna v1.5 and LLaVA-1.5 (and so DiffLMM) were TRAINED with vicuna_v1; the paper's GCG scripts
# (the reference's aas/infer_attn.py, --conv-mode default "llava_v1") PROMPT with llava_v1.
CONVERSATIONS = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
}
PAPER_CONVERSATION = "llava_v1"


def llava_v1_prompt(question: str, conversation: str = PAPER_CONVERSATION) -> str:
    """One user turn of a LLaVA v1 conversation template with the image first, ending where
    the assistant's answer begins: "{system} USER: <image>\n{question} ASSISTANT:"."""
    if conversation not in CONVERSATIONS:
        raise ValueError(
            f"conversation must be one of {', '.join(CONVERSATIONS)}, got {conversation!r}"
        )
    return f"{CONVERSATIONS[conversation]} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


# OpenAI CLIP's statistics: CLIPImageProcessor's defaults and what llava-hf ships.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's images became pixel values in training, so inference must repeat it:
    pad to square with `pad_color`, bicubic resize, then (x / 255 - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_color: tuple[int, int, int]

    @classmethod
    def llava(cls, mean=CLIP_MEAN, std=CLIP_STD) -> "Preprocessing":
        """LLaVA's `process_images` with image_aspect_ratio "pad": expand2square fills with
        int(255 * mean) of the image processor ((122, 116, 104) for CLIP's mean)."""
        return cls(tuple(mean), tuple(std), tuple(int(255 * m) for m in mean))

    def pixel_values(self, image: np.ndarray, size: int) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32."""
        return to_pixel_values(pad_to_square(image, self.pad_color), size, self.mean, self.std)


# The released LLaVA-1.5 and DiffLMM weights were trained on these pixels. (DiffLMM's code asks
# CLIPImageProcessor for mean = std = 0.5, but through keywords the class does not take, so the
# processor kept CLIP's statistics: the reference's llava/model/multimodal_encoder/sd_encoder.py.)
CLIP_PREPROCESSING = Preprocessing.llava()


def pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3), S = max(H, W), the image centred (LLaVA's expand2square:
    offset (S - H) // 2 rows or (S - W) // 2 columns); heatmap.py undoes exactly this."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    return square


def to_pixel_values(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32, normalised.

    After pad-to-square, CLIPImageProcessor's shortest-edge resize + centre crop is a plain
    bicubic resize to size x size (PIL, as the processor does)."""
    resized = np.asarray(
        Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    normalised = (resized / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1).unsqueeze(0).contiguous()


@dataclass
class Prompt:
    embeds: torch.Tensor  # (1, S, hidden) the whole prompt in the LM's dtype
    image_start: int  # index of the first visual token in the sequence
    n_image: int  # visual tokens, = grid[0] * grid[1] here; more where some are not on the map
    lm_kwargs: dict = field(
        default_factory=dict
    )  # more LM inputs for the whole prompt (e.g. 3D positions)
    grid_columns: torch.Tensor | None = (
        None  # which of the n_image tokens form the map, row-major; None: all
    )


class LlavaStyleBackend:
    """The engine's Backend for LLaVA-style models: preprocessing, prompt assembly, generation,
    teacher forcing.

    lm: a transformers causal LM taking `inputs_embeds` (LlavaForConditionalGeneration,
    LlamaForCausalLM, ...); its text attention is switched to the recording SDPA.
    Subclasses implement `encode_image`.
    """

    pads_to_square = True
    # Fixed-shape decoding (models/static_decode.py) needs an LM whose step takes nothing but the
    # token and its cache position; backends with per-prompt LM inputs set this False.
    static_decoding = True
    decoding = "dynamic"  # a DECODINGS name (build_engine sets it)

    def __init__(
        self,
        lm,
        tokenizer,
        *,
        grid: tuple[int, int],
        image_size: int,
        preprocessing: Preprocessing = CLIP_PREPROCESSING,
        conversation: str = PAPER_CONVERSATION,
    ):
        self.lm = lm.eval()
        self.tokenizer = tokenizer
        self.grid = grid
        self.image_size = image_size
        self.preprocessing = preprocessing
        llava_v1_prompt("", conversation)  # an unknown template fails here, not at the first query
        self.conversation = conversation
        self._decoders: dict[tuple[int, int, int], StaticDecoder] = {}
        self.end_ids = {tokenizer.eos_token_id}
        self.lm.set_attn_implementation(self._attention_target())

    def _attention_target(self):
        """What set_attn_implementation gets: the whole LM by default; multimodal
        wrappers route only their text model to the recorder."""
        return RECORDING_ATTENTION

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    # -- image -> visual tokens ------------------------------------------------

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, image_size, image_size) on the model's device."""
        return self.preprocessing.pixel_values(image, self.image_size).to(self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N_image, hidden). The model-specific part."""
        raise NotImplementedError

    def grid_of(self, visual_tokens) -> tuple[int, int]:
        """Every image gets the same square grid here."""
        return self.grid

    @torch.inference_mode()
    def encode_batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Every image the same size after preprocessing: one encode_image call for all."""
        tokens = self.encode_image(torch.cat([self.preprocess(image) for image in images]))
        expected = (len(images), self.grid[0] * self.grid[1])
        if tuple(tokens.shape[:2]) != expected:
            raise ValueError(
                f"encode_image gave visual tokens {tuple(tokens.shape)} for {len(images)} images, "
                f"the grid {self.grid} needs {expected[1]} each"
            )
        return list(tokens)

    def encode(self, image: np.ndarray) -> torch.Tensor:
        return self.encode_batch([image])[0]

    # -- text --------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- prompt ------------------------------------------------------------------

    def prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after "<image>", the way LLaVA's tokenizer_image_token
        does it: each chunk tokenized on its own, the BOS kept only on the first."""
        if IMAGE_PLACEHOLDER in question:
            raise InputError(
                f"the question contains {IMAGE_PLACEHOLDER!r}, which the prompt keeps for the image"
            )
        before, after = llava_v1_prompt(question, self.conversation).split(IMAGE_PLACEHOLDER)
        ids_before = self.tokenizer(before).input_ids
        ids_after = self.tokenizer(after).input_ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids_after[:1] == [bos]:
            ids_after = ids_after[1:]
        return ids_before, ids_after

    def embed(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), hidden) input embeddings."""
        return self.lm.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def prompt(
        self, visual_tokens: torch.Tensor, question: str, answer_ids: list[int] = ()
    ) -> Prompt:
        ids_before, ids_after = self.prompt_ids(question)
        embeds = torch.cat(
            [
                self.embed(ids_before),
                visual_tokens.to(self.device, self.dtype),
                self.embed(ids_after + list(answer_ids)),
            ]
        )
        return Prompt(embeds.unsqueeze(0), len(ids_before), visual_tokens.shape[0])

    # -- language model with the recorder on ---------------------------------------

    def step_kwargs(self, prompt: Prompt, position: int) -> dict:
        """More LM inputs for the one new token at sequence index `position` (none here:
        the LM counts positions itself; Qwen2.5-VL's 3D positions need them)."""
        return {}

    @staticmethod
    def on_grid(prompt: Prompt, maps: torch.Tensor) -> torch.Tensor:
        """(T, n_image) recorded maps -> (T, rows * columns) on the map grid."""
        return maps if prompt.grid_columns is None else maps[:, prompt.grid_columns.to(maps.device)]

    @torch.inference_mode()
    def generate(
        self,
        visual_tokens,
        question,
        max_new_tokens,
        on_token=None,
        should_stop=None,
        stop_at_end=True,
    ):
        """Greedy decoding over inputs_embeds with a KV cache. The map of token t is
        recorded by the forward pass that predicts it (its input ends with token t-1).
        decoding "dynamic": a DynamicCache and a list of map rows; "static" / "graphs": fixed
        shapes (models/static_decode.py), the same tokens and maps."""
        return self._generate_alone(
            self.prompt(visual_tokens, question), max_new_tokens, on_token, should_stop, stop_at_end
        )

    def _generate_alone(self, prompt: Prompt, max_new_tokens, on_token, should_stop, stop_at_end):
        if self.decoding != "dynamic":
            decoder = self._static_decoder(
                prompt.embeds.shape[1] + max_new_tokens, prompt.image_start, prompt.n_image
            )
            ids, maps = decoder.generate(
                prompt.embeds, max_new_tokens, on_token, should_stop, self.end_ids, stop_at_end
            )
            return ids, self.on_grid(prompt, maps)
        recorder = Recorder([prompt.image_start], prompt.n_image, rows=1)
        ids: list[int] = []
        with recorder:
            out = self.lm(
                inputs_embeds=prompt.embeds, use_cache=True, logits_to_keep=1, **prompt.lm_kwargs
            )
            while not take_token(
                ids,
                int(out.logits[0, -1].argmax()),
                max_new_tokens,
                on_token,
                should_stop,
                self.end_ids,
                stop_at_end,
            ):
                position = prompt.embeds.shape[1] + len(ids) - 1
                out = self.lm(
                    inputs_embeds=self.embed([ids[-1]]).unsqueeze(0),
                    cache=out.cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **self.step_kwargs(prompt, position),
                )
        return ids, self.on_grid(prompt, recorder.maps()[0])

    @torch.inference_mode()
    def generate_batch(
        self, prompts, max_new_tokens, on_token, should_stop, stop_at_end=True
    ) -> list[tuple[list[int], torch.Tensor] | Exception]:
        """Per (visual tokens, question) what generate gives it alone with its own limit,
        on_token and should_stop, or the exception that ended it: Cancelled, what its on_token
        raised, or a failed forward pass (which ends every row of that pass).

        Prompts that can share forward passes (_passes: as many image tokens, no prompt-specific
        LM inputs) decode together, one pass per step for all of them (_generate_padded); the
        others, and a batch of one, one at a time as generate does (static decoding included)."""
        if not len(prompts) == len(max_new_tokens) == len(on_token) == len(should_stop):
            raise ValueError("generate_batch needs one limit, on_token and should_stop per prompt")
        results: list = [None] * len(prompts)
        built: dict[int, Prompt] = {}
        for i, (visual, question) in enumerate(prompts):
            try:
                built[i] = self.prompt(visual, question)
            except Exception as error:  # e.g. a question the template refuses: this row's
                results[i] = error
        for group in self._passes(built):
            try:
                if len(group) == 1:
                    (i,) = group
                    results[i] = self._generate_alone(
                        built[i], max_new_tokens[i], on_token[i], should_stop[i], stop_at_end
                    )
                else:
                    # Also under static decoding: a memory-bound GPU step reads the weights once
                    # for all rows, and one fixed-shape decoder per batch layout is not worth it.
                    outcomes = self._generate_padded(
                        [built[i] for i in group],
                        [max_new_tokens[i] for i in group],
                        [on_token[i] for i in group],
                        [should_stop[i] for i in group],
                        stop_at_end,
                    )
                    for i, outcome in zip(group, outcomes):
                        results[i] = outcome
            except Exception as error:  # this pass's rows end; other passes go on
                for i in group:
                    results[i] = error
        return results

    def _generate_padded(self, prompts, max_new_tokens, on_token, should_stop, stop_at_end):
        """Prompts with as many image tokens decoded together on a DynamicCache: left-padded to
        one length, masked and positioned as if alone, the mask one column longer per step. A
        row ends at its own end token or limit, or with its own exception; an ended row's
        tokens still go in (the batch keeps its shape) but are no longer taken. -> per row (its
        ids, its maps) or its exception."""
        embeds, mask, pads = self._left_padded(prompts)
        recorder = Recorder(
            [pad + p.image_start for p, pad in zip(prompts, pads)], prompts[0].n_image, rows=1
        )
        ids: list[list[int]] = [[] for _ in prompts]
        ended: list[bool | Exception] = [False] * len(prompts)  # True: complete
        with recorder:
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # as if unpadded
                use_cache=True,
                logits_to_keep=1,
            )
            while True:
                next_ids = out.logits[:, -1].argmax(-1)  # (B,)
                for row, next_id in enumerate(next_ids.tolist()):
                    if ended[row] is False:
                        try:
                            ended[row] = take_token(
                                ids[row],
                                next_id,
                                max_new_tokens[row],
                                on_token[row],
                                should_stop[row],
                                self.end_ids,
                                stop_at_end,
                            )
                        except Exception as error:  # this row's result, not the batch's
                            ended[row] = error
                if all(end is not False for end in ended):
                    break
                mask = F.pad(mask, (0, 1), value=1)
                out = self.lm(
                    inputs_embeds=self.lm.get_input_embeddings()(next_ids[:, None]),
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    cache=out.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        maps = recorder.maps()  # (B, longest answer, n_image)
        return [
            end
            if isinstance(end, Exception)
            else (row_ids, self.on_grid(p, maps[row, : len(row_ids)]))
            for row, (p, row_ids, end) in enumerate(zip(prompts, ids, ended))
        ]

    def _static_decoder(self, tokens: int, image_start: int, n_image: int) -> StaticDecoder:
        """The decoder of the cache bucket that holds `tokens` positions, built on first use. A
        CUDA graph that cannot be captured leaves the static path without graphs, with a warning."""
        key = (cache_length(tokens), image_start, n_image)
        if key not in self._decoders:
            try:
                self._decoders[key] = StaticDecoder(self.lm, *key, graphs=self.decoding == "graphs")
            except RuntimeError as error:
                if self.decoding != "graphs":
                    raise
                log.warning(
                    "CUDA graph capture failed (%s): decoding with a static cache, without graphs",
                    error,
                )
                self._decoders[key] = StaticDecoder(self.lm, *key, graphs=False)
        return self._decoders[key]

    def warm_up(self, question: str, max_new_tokens: int) -> None:
        """Builds (and on CUDA captures) the decoder an answer to `question` will use, so the first
        query does not pay for it. Nothing to do for dynamic decoding."""
        if self.decoding == "dynamic":
            return
        before, after = self.prompt_ids(question)
        n_image = self.grid[0] * self.grid[1]
        self._static_decoder(
            len(before) + n_image + len(after) + max_new_tokens, len(before), n_image
        )

    def _teacher_force_alone(self, prompt: Prompt, rows: int) -> torch.Tensor:
        recorder = Recorder([prompt.image_start], prompt.n_image, rows=rows)
        with recorder:
            self.lm(
                inputs_embeds=prompt.embeds, use_cache=False, logits_to_keep=1, **prompt.lm_kwargs
            )
        return self.on_grid(prompt, recorder.maps()[0])

    def teacher_force(self, visual_tokens, question, answer_ids):
        """One forward pass over prompt + answer[:-1]; its last len(answer) rows are the
        positions that predict answer[0..T-1] (position t-1 for token t), as in generate."""
        return self.teacher_force_batch(question, [(visual_tokens, answer_ids)])[0]

    @torch.inference_mode()
    def teacher_force_batch(self, question, sequences) -> list[torch.Tensor]:
        """sequences: (visual tokens, answer ids) pairs, one image each (the same image or not).
        Each -> its maps (T_i, rows * columns), what teacher_force gives it alone. Sequences with
        as many image tokens share ONE forward pass (every image here: the recorder reads one
        column count per pass); prompts with their own model inputs (Qwen2.5-VL's 3D positions)
        take one pass each."""
        answers = [list(ids) for _, ids in sequences]
        if not answers or not all(answers):
            raise ValueError("teacher forcing needs at least one answer token per answer")
        prompts = [
            self.prompt(visual, question, ids[:-1]) for (visual, _), ids in zip(sequences, answers)
        ]
        maps: list[torch.Tensor | None] = [None] * len(prompts)
        for group in self._passes(dict(enumerate(prompts))):
            if prompts[group[0]].lm_kwargs:  # a group of one
                group_maps = [self._teacher_force_alone(prompts[i], len(answers[i])) for i in group]
            else:
                group_maps = self._teacher_force_padded(
                    [prompts[i] for i in group], [answers[i] for i in group]
                )
            for i, one in zip(group, group_maps):
                maps[i] = one
        return maps

    @staticmethod
    def _passes(prompts: dict[int, Prompt]) -> list[list[int]]:
        """Which prompts (by index) can share one forward pass: those with as many image tokens
        (the recorder reads one column count per pass). Prompts with their own LM inputs
        (Qwen2.5-VL's 3D positions, which padding would have to shift) take one pass each."""
        if any(p.lm_kwargs for p in prompts.values()):
            return [[i] for i in prompts]
        by_count: dict[int, list[int]] = {}
        for i, p in prompts.items():
            by_count.setdefault(p.n_image, []).append(i)
        return list(by_count.values())

    def _left_padded(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prompt embeddings left-padded to one length -> (embeds (B, L, hidden), attention
        mask (B, L), each row's padding)."""
        length = max(p.embeds.shape[1] for p in prompts)
        pads = [length - p.embeds.shape[1] for p in prompts]
        hidden = prompts[0].embeds.shape[2]
        embeds = torch.cat(
            [
                torch.cat([prompts[0].embeds.new_zeros(1, pad, hidden), p.embeds], dim=1)
                for p, pad in zip(prompts, pads)
            ]
        )
        mask = torch.tensor([[0] * pad + [1] * (length - pad) for pad in pads], device=self.device)
        return embeds, mask, pads

    def _teacher_force_padded(
        self, prompts: list[Prompt], answers: list[list[int]]
    ) -> list[torch.Tensor]:
        """prompt + answer[:-1] sequences with as many image tokens in ONE forward pass:
        left-padded to one length (so every answer ends at the last position), masked and
        positioned as if alone, each row's image columns where its prompt has them."""
        embeds, mask, pads = self._left_padded(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded
        rows = max(map(len, answers))
        recorder = Recorder(
            [pad + p.image_start for p, pad in zip(prompts, pads)], prompts[0].n_image, rows=rows
        )
        with recorder:
            self.lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            )
        maps = recorder.maps()  # (B, rows, n_image)
        return [
            self.on_grid(p, maps[i, rows - len(ids) :])
            for i, (p, ids) in enumerate(zip(prompts, answers))
        ]
