"""Greedy decoding and teacher forcing of 1..N prompts at fixed shapes, with the attention
recorder on: the one decoder every backend uses, on the CPU and on a GPU.

A Prompt (a backend builds it) is one row: its embeddings, its positions, its image columns.
Rows of a batch are left-padded to one length, masked and positioned as if alone.

- Teacher forcing is one prefill without a cache that records each row's T trailing rows.
- Generation is a prefill into a static KV cache, then one fixed-shape step per token for all
  rows. The step's inputs and outputs are static tensors updated in place: each row's newest
  token, its next position, the cache slot, the padding it masks, and the map buffer
  (models/recorder.py: AttentionRecord), so the step allocates nothing and its only host sync
  is reading the B new token ids that streaming and stopping need. A row that ends (its end
  token, its limit, its should_stop, its on_token raising) is no longer taken; the batch keeps
  its shape until every row has ended.
- Shapes come in buckets: rows pad to a power of two (idle rows repeat row 0), the cache length
  and the map rows (the longest answer) to multiples of CACHE_BUCKET, so a few shapes serve
  every query. Each bucket has its own cache and buffers, built on first use or by warm_up.
- On CUDA the step of each bucket is captured once as a CUDA graph and replayed. With
  `compile`, the step is torch.compile'd (fullgraph: the recorder's per-layer work is
  traceable) and the compiled step is what the graph captures.

The prefill runs eagerly at the prompts' own length (it varies with every question).
Nothing here needs a dynamic cache: Qwen2.5-VL's 3D rotary positions are one more static
input (all three axes of a generated token are one number, a row's next position).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs

from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.recorder import AttentionRecord

log = logging.getLogger(__name__)

# Cache lengths are multiples of this: few buckets, few captured graphs.
CACHE_BUCKET = 256


def cache_length(tokens: int) -> int:
    """The cache bucket that holds `tokens` positions."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


def batch_bucket(rows: int) -> int:
    """The batch bucket that holds `rows` rows: the next power of two."""
    return 1 << (rows - 1).bit_length()


@dataclass
class Prompt:
    """One row: what the LM reads and where its image is."""

    # (1, S, hidden) the whole prompt in the LM's dtype
    embeds: torch.Tensor
    # (1, S) the LM's position ids, or (3, 1, S) for 3D rotary positions (Qwen2.5-VL)
    positions: torch.Tensor
    # the position of the first generated token (on every axis)
    next_position: int
    # index of the first visual token in the sequence, and how many there are
    image_start: int
    n_image: int
    # which of the n_image tokens form the map, row-major; None: all
    grid_columns: torch.Tensor | None = None

    def on_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """(T, n_image) maps -> (T, rows * columns) on the map grid."""
        if self.grid_columns is None:
            return maps
        return maps[:, self.grid_columns.to(maps.device)]


@dataclass
class Row:
    """One answer being decoded: its limit and callbacks, the ids so far and how it ended."""

    limit: int
    on_token: Callable[[list[int]], None] | None
    should_stop: Callable[[], bool] | None
    ids: list[int] = field(default_factory=list)
    # False while it goes on; True when complete; the exception that ended it
    ended: bool | Exception = False
    # (T, rows * columns) the maps of its T ids, once decoding is over
    maps: torch.Tensor | None = None


def attention_masks(text_config, query_slots, keys: int, pads):
    """Boolean masks (B, 1, Q, keys) of queries at cache slots `query_slots` (Q,) for rows
    left-padded by `pads` (B,): causal, padding hidden, each layer type's sliding window.
    -> one mask, or {layer type: mask} when the layers differ (Qwen2's mixed layers)."""
    key_slots = torch.arange(keys, device=query_slots.device)
    causal = key_slots[None, :] <= query_slots[:, None]
    allowed = causal[None] & (key_slots[None, None, :] >= pads[:, None, None])
    masks = {}
    # One mask per layer type (the layers of a type share it).
    layer_types = dict(zip(*get_layer_types_and_kwargs(text_config)))
    for layer_type, options in layer_types.items():
        if layer_type == "sliding_attention":
            window = key_slots[None, :] > query_slots[:, None] - options["sliding_window"]
            mask = allowed & window[None]
        elif layer_type == "full_attention":
            mask = allowed
        else:
            raise ValueError(f"the decoder has no mask for {layer_type!r} layers")
        # A padding query sees no key at all; it sees every key instead (its output is never
        # read), so no row of the softmax is all -inf (NaN would reach the values).
        masks[layer_type] = (mask | ~mask.any(-1, keepdim=True))[:, None]
    return masks if len(masks) > 1 else next(iter(masks.values()))


def left_padded(prompts: list[Prompt], rows: int):
    """prompts padded on the left to one length, and to `rows` rows by repeating the first ->
    (embeds (rows, S, hidden), positions (rows, S) or (3, rows, S), pads (rows,))."""
    prompts = prompts + [prompts[0]] * (rows - len(prompts))
    length = max(p.embeds.shape[1] for p in prompts)
    pads = [length - p.embeds.shape[1] for p in prompts]
    embeds = torch.cat([F.pad(p.embeds, (0, 0, pad, 0)) for p, pad in zip(prompts, pads)])
    positions = torch.cat([F.pad(p.positions, (pad, 0)) for p, pad in zip(prompts, pads)], dim=-2)
    return embeds, positions, torch.tensor(pads, device=embeds.device)


class Buffers:
    """The static tensors of one (batch, cache length) bucket: the KV cache, the map buffer and
    the step's inputs; and its CUDA graph once captured."""

    def __init__(self, lm, batch: int, length: int, map_rows: int, position_axes: int | None):
        text = lm.config.get_text_config()
        device = lm.get_input_embeddings().weight.device
        self.length = length
        self.text_config = text
        # Every layer keeps every position (sliding-window layers too: the mask holds the
        # window), so the recorder's key columns are sequence columns.
        self.cache = Cache(layers=[StaticLayer(length) for _ in range(text.num_hidden_layers)])
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache.early_initialization(
            batch,
            text.num_key_value_heads,
            head_dim,
            lm.get_input_embeddings().weight.dtype,
            device,
        )
        self.record = AttentionRecord.of(lm, batch, map_rows, length)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        shape = (batch, 1) if position_axes is None else (position_axes, batch, 1)
        self.positions = torch.zeros(shape, dtype=torch.long, device=device)
        self.pads = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def rewind(self) -> None:
        self.cache.reset()
        self.record.rewind()


def decode_step(lm, buffers: Buffers) -> None:
    """One token for every row, in place: buffers.token at buffers.slot -> the next token; the
    slot and positions move on. Traceable (torch.compile fullgraph) and capturable."""
    masks = attention_masks(buffers.text_config, buffers.slot, buffers.length, buffers.pads)
    logits = lm(
        inputs_embeds=lm.get_input_embeddings()(buffers.token),
        attention_mask=masks,
        position_ids=buffers.positions,
        cache=buffers.cache,
        use_cache=True,
        logits_to_keep=1,
        attention_record=buffers.record,
    ).logits
    buffers.token.copy_(logits[:, -1:].argmax(-1))
    buffers.slot += 1
    buffers.positions += 1


class Decoder:
    """Greedy decoding and teacher forcing of `lm` (a transformers causal LM on inputs_embeds
    whose text attention is RECORDING_ATTENTION) for any number of prompts.

    compile: torch.compile the per-token step (fullgraph; inductor's default mode, the CUDA
    graph being this decoder's own). graphs: capture the step as a CUDA graph per bucket
    (default: on CUDA)."""

    def __init__(self, lm, *, compile: bool = False, graphs: bool | None = None):
        self.lm = lm
        device = lm.get_input_embeddings().weight.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.compile = compile
        self.step = torch.compile(decode_step, fullgraph=True) if compile else decode_step
        self.text_config = lm.config.get_text_config()
        # (rows, cache length, map rows) -> that bucket's buffers
        self.buffers: dict[tuple[int, int, int], Buffers] = {}

    # -- teacher forcing ---------------------------------------------------------------------

    @torch.inference_mode()
    def teacher_force(self, prompts: list[Prompt], answer_lengths: list[int]) -> list[torch.Tensor]:
        """Prompts that end with their answer but its last token (prompt + answer[:-1]) in ONE
        forward pass -> per row the maps (T, rows * columns) of its T answer tokens: position
        t - 1 for token t, as generation reads them."""
        embeds, positions, pads = left_padded(prompts, len(prompts))
        rows = max(answer_lengths)
        record = AttentionRecord.of(self.lm, len(prompts), rows, embeds.shape[1], rows=rows)
        self.prefill(embeds, positions, pads, record)
        return [
            self._maps(record, i, p, int(pads[i]), slice(rows - n, rows))
            for i, (p, n) in enumerate(zip(prompts, answer_lengths))
        ]

    def prefill(self, embeds, positions, pads, record: AttentionRecord, cache=None):
        """One pass over left-padded prompts (B, S, hidden) at their own length, recording
        record.rows trailing rows each; into `cache` (a static cache: keys are its slots) or
        without one (keys are the S positions). -> the last position's logits (B, 1, vocab)."""
        slots = torch.arange(embeds.shape[1], device=embeds.device)
        keys = embeds.shape[1] if cache is None else cache.layers[0].max_cache_len
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_masks(self.text_config, slots, keys, pads),
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
            attention_record=record,
        ).logits

    @staticmethod
    def _maps(record, index: int, prompt: Prompt, pad: int, rows: slice) -> torch.Tensor:
        start = pad + prompt.image_start
        return prompt.on_grid(record.read(index, rows, slice(start, start + prompt.n_image)))

    # -- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[Prompt],
        rows: list[Row],
        end_ids: set[int],
        stop_at_end: bool = True,
    ) -> None:
        """Greedy answers of `prompts`, each into its Row: ids (the end token included when
        emitted), maps and how it ended. Each new token joins its
        row's ids and is streamed (on_token(ids)); the row is complete at an end token (with
        stop_at_end) or at its limit; otherwise its should_stop() may cancel it. An exception
        of one row's callbacks ends that row only; a failed forward pass raises."""
        embeds, positions, pads = left_padded(prompts, batch_bucket(len(prompts)))
        longest = max(row.limit for row in rows)
        length = cache_length(embeds.shape[1] + longest)
        buffers = self.buffers_for(embeds.shape[0], length, cache_length(longest), positions)
        buffers.rewind()
        logits = self.prefill(embeds, positions, pads, buffers.record, buffers.cache)
        buffers.token.copy_(logits[:, -1:].argmax(-1))
        buffers.slot.fill_(embeds.shape[1])
        buffers.pads.copy_(pads)
        next_positions = [p.next_position for p in prompts]
        next_positions += next_positions[:1] * (embeds.shape[0] - len(prompts))
        buffers.positions.copy_(
            torch.tensor(next_positions, device=embeds.device)
            .view(-1, 1)
            .expand_as(buffers.positions)
        )
        while True:
            # The one host sync per token.
            tokens = buffers.token[: len(rows), 0].tolist()
            for row, token in zip(rows, tokens):
                if row.ended is False:
                    self._append(row, token, end_ids, stop_at_end)
            if all(row.ended is not False for row in rows):
                break
            if buffers.graph is not None:
                buffers.graph.replay()
            else:
                self.step(self.lm, buffers)
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            row.maps = self._maps(buffers.record, i, prompt, int(pads[i]), slice(0, len(row.ids)))

    @staticmethod
    def _append(row: Row, token: int, end_ids: set[int], stop_at_end: bool) -> None:
        """token joins the row and is streamed; the row ends complete at an end token or its
        limit, cancelled when its should_stop says so, or with what its on_token raised."""
        try:
            row.ids.append(token)
            if row.on_token is not None:
                row.on_token(row.ids)
            if (stop_at_end and token in end_ids) or len(row.ids) >= row.limit:
                row.ended = True
            elif row.should_stop is not None and row.should_stop():
                raise Cancelled(f"stopped after {len(row.ids)} tokens")
        except Exception as error:  # this row's result, not the batch's
            row.ended = error

    def warm_up(self, prompt: Prompt, batch_sizes: list[int], max_new_tokens: int) -> None:
        """Builds (on CUDA: captures; with compile: compiles) the buckets that answers of up to
        max_new_tokens to `prompt` in batches of `batch_sizes` rows use, so that no query pays
        for it: each decodes two tokens there."""
        for batch in sorted({batch_bucket(n) for n in batch_sizes}):
            rows = [Row(max_new_tokens, None, None) for _ in range(batch)]
            for row in rows:
                row.should_stop = lambda row=row: len(row.ids) >= 2
            self.generate([prompt] * batch, rows, set(), stop_at_end=False)

    # -- buckets -----------------------------------------------------------------------------

    def buffers_for(
        self, batch: int, length: int, map_rows: int, positions: torch.Tensor
    ) -> Buffers:
        """The bucket's buffers, built (and on CUDA its step captured) on first use."""
        key = (batch, length, map_rows)
        if key not in self.buffers:
            axes = positions.shape[0] if positions.dim() == 3 else None
            buffers = Buffers(self.lm, batch, length, map_rows, axes)
            if self.graphs:
                try:
                    self._capture(buffers)
                except RuntimeError as error:
                    log.warning("CUDA graph capture failed (%s): decoding without graphs", error)
            self.buffers[key] = buffers
        return self.buffers[key]

    @torch.inference_mode()
    def _capture(self, buffers: Buffers) -> None:
        """Record the step as a CUDA graph, after runs on a side stream (as CUDA graphs require;
        a compiled step compiles there). The runs write a cache that every query rewinds."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                buffers.rewind()
                buffers.slot.zero_()
                self.step(self.lm, buffers)
        torch.cuda.current_stream().wait_stream(stream)
        buffers.rewind()
        buffers.slot.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(self.lm, buffers)
        buffers.graph = graph
