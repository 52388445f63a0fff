"""Greedy decoding at fixed shapes, with the attention recorder on: the fast path on a GPU.

The dynamic path (LlavaStyleBackend.generate) grows a DynamicCache and a list of map rows
token by token; each step allocates, and launching a 7B model's ~500 kernels one by one
from Python costs more than the memory traffic the step needs. Here:
- the KV cache is a transformers StaticCache of `length` slots (a few length buckets),
- each step's map row is written in place into a preallocated buffer at a device step
  index (engine/recorder.py: BufferRecorder), so the per-token step allocates nothing and
  its only host sync is the one argmax id that streaming and stopping need,
- on CUDA the per-token step is captured once as a CUDA graph (torch.cuda.CUDAGraph) and
  replayed: its inputs (token id, cache position) and outputs (logits) are static tensors.
The prefill (one pass over the prompt, whose length varies) runs eagerly into the same cache.
A decoder is built per bucket and reused by every query; warm_up() builds and captures it
before the first query.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StaticCache

from groundlmm_ros.engine.recorder import BufferRecorder
from groundlmm_ros.engine.types import Cancelled

CACHE_BUCKET = 256  # cache lengths are multiples of this: few buckets, few captured graphs
# "dynamic": DynamicCache (the plain path); "static": StaticCache + map buffer; "graphs": static
# with the per-token step replayed from a CUDA graph (CUDA only).
DECODINGS = ("dynamic", "static", "graphs")


def cache_length(tokens: int) -> int:
    """The bucket that holds `tokens` positions."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


def take_token(
    ids: list[int],
    next_id: int,
    limit: int,
    on_token: Callable[[list[int]], None] | None,
    should_stop: Callable[[], bool] | None,
    end_ids: set[int],
    stop_at_end: bool,
) -> bool:
    """Greedy decoding's rule for each new token, for every decoder: next_id joins ids and is
    streamed (on_token(ids)); -> True when the answer is complete (an end token with
    stop_at_end, or `limit` tokens); raises Cancelled when should_stop() then says so."""
    ids.append(next_id)
    if on_token is not None:
        on_token(ids)
    if (stop_at_end and next_id in end_ids) or len(ids) >= limit:
        return True
    if should_stop is not None and should_stop():
        raise Cancelled(f"stopped after {len(ids)} tokens")
    return False


class StaticDecoder:
    """Fixed-shape greedy decoding of `lm` (a transformers causal LM on inputs_embeds whose
    attention is the recording SDPA) for prompts whose image tokens sit at `image_start`."""

    def __init__(self, lm, length: int, image_start: int, n_image: int, graphs: bool):
        self.lm, self.length, self.image_start, self.n_image = lm, length, image_start, n_image
        device = lm.get_input_embeddings().weight.device
        text = lm.config.get_text_config()
        self.layers = text.num_hidden_layers
        self.cache = StaticCache(config=lm.config, max_cache_len=length)
        self.maps = torch.zeros(1, length, n_image, device=device)  # (1, steps, n_image) rows
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # the row being written
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the step's input id
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # its cache slot
        self.logits: torch.Tensor | None = None  # the step's output
        self.graph: torch.cuda.CUDAGraph | None = None
        if graphs:
            self._capture()

    def _recorder(self) -> BufferRecorder:
        return BufferRecorder(
            [self.image_start], self.n_image, self.maps, self.step_index, self.layers
        )

    def _step(self) -> None:
        """One token through the LM: self.token at self.position -> self.logits (1, 1, vocab)."""
        embeds = self.lm.get_input_embeddings()(self.token)
        self.logits = self.lm(
            inputs_embeds=embeds,
            cache=self.cache,
            cache_position=self.position,
            use_cache=True,
            logits_to_keep=1,
        ).logits

    @torch.inference_mode()
    def _capture(self) -> None:
        """Record the step as a CUDA graph (after warm-up runs on a side stream, as CUDA graphs
        require); the recorder's add() runs here once and its in-place writes are replayed."""
        self.position.fill_(self.length - 1)  # a slot no prompt uses; the cache is reset per query
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._recorder():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with self._recorder(), torch.cuda.graph(self.graph):
            self._step()

    @torch.inference_mode()
    def generate(
        self,
        embeds: torch.Tensor,
        max_new_tokens: int,
        on_token: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        end_ids: set[int] = frozenset(),
        stop_at_end: bool = True,
    ) -> tuple[list[int], torch.Tensor]:
        """embeds (1, S, hidden), the whole prompt -> (answer ids, maps (T, n_image)), as the
        dynamic path returns them."""
        prompt_length = embeds.shape[1]
        if prompt_length + max_new_tokens > self.length:
            raise ValueError(
                f"{prompt_length} + {max_new_tokens} tokens do not fit a cache of {self.length}"
            )
        self.cache.reset()
        self.step_index.zero_()
        recorder = self._recorder()
        ids: list[int] = []
        with recorder:
            out = self.lm(
                inputs_embeds=embeds,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
                cache_position=torch.arange(prompt_length, device=embeds.device),
            )
            recorder.advance()
            self.token.copy_(out.logits[:, -1:].argmax(-1))
            self.position.fill_(prompt_length)
            # int(self.token): the one host sync per token
            while not take_token(
                ids, int(self.token), max_new_tokens, on_token, should_stop, end_ids, stop_at_end
            ):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
                recorder.advance()
                self.token.copy_(self.logits[:, -1:].argmax(-1))
                self.position += 1
        return ids, recorder.maps()[0]
