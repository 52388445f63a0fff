"""Attention recorder: per generated token, the attention of the query row that
predicts it over the image-token key columns, averaged over all heads and all
layers (docs/method.md, step 2), reduced on the fly inside SDPA.

The reference keeps `generate(output_attentions=True)`'s eager tensors
(layers x heads x queries x keys per step). Here the model runs on SDPA under
the registered name RECORDING_ATTENTION; while a Recorder is active, each
attention call also scores only its newest `rows` query rows against all keys
(softmax needs the whole row), keeps the image columns, means over heads and
adds them to a running sum over layers: memory O(tokens x image tokens).

A forward pass is one "step" (it starts at layer 0). Generation records one
row per step (the newest position, which predicts the next token); a
teacher-forced pass records `rows` trailing rows in one step.

Sliding-window layers: their cache keeps only the window's latest keys, so a
layer may see fewer keys than the sequence has; the keys are then the
sequence's last ones, and the columns before them (out of the window, masked)
get attention 0, as the same layer under eager attention gives them.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

RECORDING_ATTENTION = "groundlmm_recording_sdpa"

_active: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "groundlmm_recorder", default=None
)


class Recorder:
    """Collects image-attention rows while active (`with recorder:`).

    image_start: per batch row, the key index of its first image token
        (differs per row under left padding); n_image: image tokens per row.
    rows: how many trailing query rows each forward pass records (1 while
        generating; the answer length for a teacher-forced pass).
    """

    def __init__(self, image_start: list[int], n_image: int, rows: int = 1):
        self.image_start = [int(start) for start in image_start]
        self.n_image = n_image
        self._columns: torch.Tensor | None = (
            None  # (B, n_image) key indices, built once when rows differ
        )
        self.rows = rows
        self._steps: list[torch.Tensor] = []  # each (B, rows, n_image) float32, summed over layers
        self._layers = 0  # layers seen in the latest step
        self.positions = 0  # sequence positions seen so far (queries of every step)
        self._token = None

    def __enter__(self) -> Recorder:
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)

    def add(self, layer_idx: int, row_maps: torch.Tensor) -> None:
        """row_maps: (B, rows, n_image), this layer's head-mean attention."""
        if layer_idx == 0:
            self._steps.append(row_maps.clone())
            self._layers = 1
        else:
            self._steps[-1] += row_maps
            self._layers += 1

    def maps(self) -> torch.Tensor:
        """(B, T, n_image) float32: every recorded row in order, averaged over layers."""
        if not self._steps:
            raise RuntimeError(
                "the recorder saw no attention call: is the model on RECORDING_ATTENTION?"
            )
        return torch.cat(self._steps, dim=1) / self._layers

    @property
    def nbytes(self) -> int:
        return sum(step.numel() * step.element_size() for step in self._steps)


class BufferRecorder(Recorder):
    """For fixed-shape decoding: one row per step, written in place into `buffer` (B, capacity,
    n_image) at the device index `step` (1,), so a step allocates nothing and syncs nothing with
    the host, and can be replayed from a CUDA graph (where add() runs only at capture). The
    caller advances after each forward pass; `layers` is the LM's attention layer count."""

    def __init__(
        self,
        image_start: list[int],
        n_image: int,
        buffer: torch.Tensor,
        step: torch.Tensor,
        layers: int,
    ):
        super().__init__(image_start, n_image, rows=1)
        self.buffer, self.step, self.layers, self.written = buffer, step, layers, 0

    def add(self, layer_idx: int, row_maps: torch.Tensor) -> None:
        if layer_idx == 0:
            self.buffer.index_copy_(1, self.step, row_maps)
        else:
            self.buffer.index_add_(1, self.step, row_maps)

    def advance(self) -> None:
        self.step += 1
        self.written += 1

    def maps(self) -> torch.Tensor:
        if not self.written:
            raise RuntimeError("the recorder recorded no step")
        return self.buffer[:, : self.written] / self.layers

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def _image_rows(recorder: Recorder, query, key, attention_mask, scaling) -> torch.Tensor:
    """(B, rows, n_image): softmax(q k^T * scaling + mask) of the trailing query rows,
    image columns only, mean over heads. Computed in float32 like eager's softmax."""
    batch, n_heads, q_len, head_dim = query.shape
    n_kv_heads, k_len = key.shape[1], key.shape[2]
    rows = min(recorder.rows, q_len)
    # Group query heads by their shared key head (GQA) instead of repeating the keys:
    # query head h uses key head h // n_rep. (B, H_kv, n_rep * rows, D)
    q = query[:, :, q_len - rows :].float().reshape(batch, n_kv_heads, -1, head_dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, H_kv, n_rep * rows, K)
    scores = scores.view(batch, n_heads, rows, k_len)
    if attention_mask is not None:
        mask = attention_mask[:, :, q_len - rows :, -k_len:]  # (B or 1, 1, rows, K)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    elif q_len > 1:
        # No mask and several queries means SDPA's is_causal (upper-left aligned): query i sees
        # keys <= i. That also hides a static cache's unfilled slots from a prefill.
        query_index = torch.arange(q_len - rows, q_len, device=query.device)[:, None]
        scores = scores.masked_fill(
            torch.arange(k_len, device=query.device)[None, :] > query_index, float("-inf")
        )
    probs = scores.softmax(dim=-1)
    # Keys a sliding-window cache no longer holds. (More keys than positions: a static cache's
    # unfilled slots, which the mask hides.)
    evicted = recorder.positions - k_len
    if evicted > 0:
        probs = F.pad(probs, (evicted, 0))  # back to sequence columns; evicted keys get attention 0
    starts = recorder.image_start
    if len(set(starts)) == 1:  # python ints: no device sync per layer
        image = probs[..., starts[0] : starts[0] + recorder.n_image]
    else:
        if recorder._columns is None or recorder._columns.device != query.device:
            recorder._columns = torch.tensor(starts, device=query.device)[:, None] + torch.arange(
                recorder.n_image, device=query.device
            )  # (B, n_image)
        image = probs.gather(
            -1, recorder._columns[:, None, None, :].expand(batch, n_heads, rows, -1)
        )
    return image.mean(dim=1)


def recording_sdpa_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """SDPA, plus the recorder's reduction when a Recorder is active.

    query (B, H, Q, D), key/value (B, H_kv, K, D) with K including the cache;
    attention_mask as built by sdpa_mask: bool (B|1, 1, Q, K), or None when SDPA's
    is_causal suffices.
    """
    recorder = _active.get()
    if recorder is not None:
        if (
            module.layer_idx == 0
        ):  # a new step: as many new positions as queries (all of them without a cache)
            q_len, k_len = query.shape[2], key.shape[2]
            recorder.positions = q_len if q_len == k_len else recorder.positions + q_len
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recorder.add(module.layer_idx, _image_rows(recorder, query, key, attention_mask, scale))
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


# The mask entry matters: an implementation missing from AttentionMaskInterface gets
# no mask at all, so left-padded rows would attend to padding.
AttentionInterface.register(RECORDING_ATTENTION, recording_sdpa_forward)
AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)
