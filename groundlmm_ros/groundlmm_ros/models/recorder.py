"""Attention recorder: per answer token, the attention of the query row that predicts it over
the key columns, averaged over all heads and all layers (docs/method.md, step 2), reduced on
the fly inside SDPA.

The reference keeps `generate(output_attentions=True)`'s eager tensors (layers x heads x
queries x keys per step). Here the text model runs on SDPA under the registered name
RECORDING_ATTENTION; a forward pass given `attention_record=AttentionRecord(...)` (transformers
hands unknown forward arguments down to the attention function) also scores its trailing
`rows` query rows against the keys (softmax needs the whole row), means over heads and adds
them into the record's buffer: memory O(rows x keys), whatever the model's size.

Everything the per-layer work touches is a tensor of the record (its buffer and its device row
index), so a decoding step that records can be compiled (torch.compile, fullgraph) and
replayed from a CUDA graph: no host sync, no Python list, no lookup of ambient state.

Key columns are sequence columns: a pass without a cache, a static cache whose every layer
keeps all positions (models/decoder.py builds it so, sliding-window layers included; their
window is in the mask), or a dynamic cache of full-attention layers. The buffer row of a
pass's first recorded row is `row`; the last layer moves it on by `rows`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

RECORDING_ATTENTION = "groundlmm_recording_sdpa"


class AttentionRecord:
    """The maps of `batch` sequences: `capacity` rows of up to `keys` key columns each.

    rows: the trailing query rows each forward pass records (1 while generating: the newest
    position, which predicts the next token; the answer length for a teacher-forced pass).
    layers: the text model's attention layers (the maps are their mean)."""

    def __init__(
        self, batch: int, capacity: int, keys: int, layers: int, *, rows: int = 1, device=None
    ):
        self.maps = torch.zeros(batch, capacity, keys, device=device)
        self.row = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.arange(rows, device=device)
        self.rows, self.layers = rows, layers

    @classmethod
    def of(cls, lm, batch: int, capacity: int, keys: int, *, rows: int = 1) -> AttentionRecord:
        """A record for the text model of `lm` (a transformers model), on its device."""
        layers = lm.config.get_text_config().num_hidden_layers
        device = lm.get_input_embeddings().weight.device
        return cls(batch, capacity, keys, layers, rows=rows, device=device)

    def add(self, layer_idx: int, row_maps: torch.Tensor) -> None:
        """row_maps: (B, rows, K) one layer's head-mean attention, K <= keys."""
        self.maps[:, :, : row_maps.shape[-1]].index_add_(1, self.row + self.offsets, row_maps)
        if layer_idx == self.layers - 1:
            self.row += self.rows

    def rewind(self) -> None:
        """Empty, for the next sequences."""
        self.maps.zero_()
        self.row.zero_()

    def recorded(self) -> int:
        """Rows written so far (a host sync: read it after the passes)."""
        return int(self.row)

    def read(self, index: int, rows: slice, columns: slice) -> torch.Tensor:
        """(rows, columns) of sequence `index`, the mean over layers."""
        return self.maps[index, rows, columns] / self.layers

    @property
    def nbytes(self) -> int:
        return self.maps.numel() * self.maps.element_size()


def head_mean_rows(query, key, attention_mask, scaling, rows: int) -> torch.Tensor:
    """(B, rows, K): softmax(q k^T * scaling + mask) of the trailing query rows, mean over heads.
    Computed in float32 like eager's softmax."""
    batch, n_heads, q_len, head_dim = query.shape
    n_kv_heads, k_len = key.shape[1], key.shape[2]
    rows = min(rows, q_len)
    # Group query heads by their shared key head (GQA) instead of repeating the keys:
    # query head h uses key head h // n_rep. (B, H_kv, n_rep * rows, D)
    q = query[:, :, q_len - rows :].float().reshape(batch, n_kv_heads, -1, head_dim)
    # (B, H_kv, n_rep * rows, K)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling
    scores = scores.view(batch, n_heads, rows, k_len)
    if attention_mask is not None:
        # (B or 1, 1, rows, K)
        mask = attention_mask[:, :, q_len - rows :, -k_len:]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    elif q_len > 1:
        # No mask and several queries means SDPA's is_causal (upper-left aligned): query i sees
        # keys <= i.
        query_index = torch.arange(q_len - rows, q_len, device=query.device)[:, None]
        scores = scores.masked_fill(
            torch.arange(k_len, device=query.device)[None, :] > query_index, float("-inf")
        )
    return scores.softmax(dim=-1).mean(dim=1)


def recording_sdpa_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    attention_record: AttentionRecord | None = None,
    **kwargs,
):
    """SDPA, plus the record's reduction when the pass was given one.

    query (B, H, Q, D), key/value (B, H_kv, K, D) with K including the cache;
    attention_mask bool or additive (B|1, 1, Q, K), or None when SDPA's is_causal suffices.
    """
    if attention_record is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        attention_record.add(
            module.layer_idx,
            head_mean_rows(query, key, attention_mask, scale, attention_record.rows),
        )
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


# The mask entry matters: an implementation missing from AttentionMaskInterface gets
# no mask at all, so left-padded rows would attend to padding.
AttentionInterface.register(RECORDING_ATTENTION, recording_sdpa_forward)
AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)
