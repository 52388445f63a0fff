"""The recorder's maps equal the reference's: eager generate(output_attentions=True), the newest
query row over the image columns, mean over all layers and heads; alone and in a left-padded
batch decoded together."""

import pytest
import torch
from images import random_rgb

from groundlmm_ros.models.llava import llava_backend
from groundlmm_ros.models.recorder import RECORDING_ATTENTION, AttentionRecord
from groundlmm_ros.models.tiny import tiny_llava, tiny_tokenizer

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def backend():
    tokenizer = tiny_tokenizer()
    return llava_backend(tiny_llava(len(tokenizer), seed=3), tokenizer)


@pytest.fixture(scope="module")
def eager(backend):
    model = tiny_llava(len(backend.tokenizer), seed=3)
    model.set_attn_implementation("eager")
    return model


def image(seed, height=40, width=56):
    return random_rgb(height, width, seed)


def reference_maps(attentions, image_starts, n_image):
    """The reference's reduction of generate()'s eager attentions: per step, per batch row,
    layers x heads x [newest query row, image columns], mean over layers and heads. -> (B, T, N)"""
    steps = []
    for step in attentions:  # one tuple of layers per generated token
        per_row = []
        for b, start in enumerate(image_starts):
            # (L, H, N)
            layers = torch.stack([layer[b, :, -1, start : start + n_image] for layer in step])
            per_row.append(layers.mean(dim=(0, 1)))
        steps.append(torch.stack(per_row))
    return torch.stack(steps, dim=1)


def eager_generate(model, embeds, attention_mask=None):
    with torch.inference_mode():
        return model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )


def test_model_runs_on_the_recording_attention(backend):
    assert backend.lm.config.text_config._attn_implementation == RECORDING_ATTENTION
    assert backend.lm.config.vision_config._attn_implementation != RECORDING_ATTENTION


def test_batch_of_one_matches_eager_generate(backend, eager):
    visual = backend.encode(image(0))
    question = "Describe the image in detail."
    ids, maps = backend.generate(visual, question, NEW_TOKENS, stop_at_end=False)
    prompt = backend.prompts.prompt(visual, question)
    out = eager_generate(eager, prompt.embeds)
    assert ids == out.sequences[0, -NEW_TOKENS:].tolist()
    expected = reference_maps(out.attentions, [prompt.image_start], prompt.n_image)[0]
    assert (
        maps.shape
        == expected.shape
        == (NEW_TOKENS, backend.prompts.grid[0] * backend.prompts.grid[1])
    )
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    # Not a trivial agreement: the maps differ from token to token.
    assert (maps[1:] - maps[:-1]).abs().max() > 1e-4


def test_left_padded_batch_of_two_matches_eager_generate(backend, eager):
    """Two prompts of different lengths decoded together (left-padded): each row's image columns
    start at its own offset and the padding must stay masked."""
    questions = [
        "Describe the image in detail.",
        "What is on the table next to the red mug and the lamp?",
    ]
    visual = [backend.encode(image(seed)) for seed in (1, 2)]
    prompts = [backend.prompts.prompt(v, q) for v, q in zip(visual, questions)]
    length = max(p.embeds.shape[1] for p in prompts)
    pad_id = torch.tensor([backend.tokenizer.pad_token_id])
    pad = backend.lm.get_input_embeddings()(pad_id)[None]  # (1, 1, hidden)
    embeds, mask, starts = [], [], []
    for p in prompts:
        n_pad = length - p.embeds.shape[1]
        embeds.append(torch.cat([pad.expand(1, n_pad, -1), p.embeds], dim=1))
        mask.append([0] * n_pad + [1] * p.embeds.shape[1])
        starts.append(n_pad + p.image_start)
    embeds, mask = torch.cat(embeds), torch.tensor(mask)
    assert starts[0] != starts[1]

    got = backend.generate_batch(
        list(zip(visual, questions)), [NEW_TOKENS] * 2, [None] * 2, [None] * 2, stop_at_end=False
    )
    out = eager_generate(eager, embeds, mask)
    expected = reference_maps(out.attentions, starts, prompts[0].n_image)
    for b, (ids, maps) in enumerate(got):
        assert ids == out.sequences[b, -NEW_TOKENS:].tolist()
        torch.testing.assert_close(maps, expected[b], atol=1e-5, rtol=0)
        # The row decoded alone gets the same (padding really is masked).
        alone_ids, alone = backend.generate(visual[b], questions[b], NEW_TOKENS, stop_at_end=False)
        assert alone_ids == ids
        torch.testing.assert_close(maps, alone, atol=1e-5, rtol=0)


def test_teacher_forcing_reads_the_rows_generation_reads(backend):
    """Refer mode's single pass gives token t the row at position t-1, as generation does;
    reading each token's own position instead gives different maps."""
    visual = backend.encode(image(4, 64, 32))
    question = "Describe the image in detail."
    ids, generated = backend.generate(visual, question, NEW_TOKENS, stop_at_end=False)
    forced = backend.teacher_force(visual, question, ids)
    torch.testing.assert_close(forced, generated, atol=1e-5, rtol=0)

    prompt = backend.prompts.prompt(visual, question, ids)  # the whole answer as input
    length = prompt.embeds.shape[1]
    own_position = AttentionRecord.of(backend.lm, 1, len(ids), length, rows=len(ids))
    with torch.inference_mode():
        backend.lm(inputs_embeds=prompt.embeds, attention_record=own_position)
    columns = slice(prompt.image_start, prompt.image_start + prompt.n_image)
    assert (own_position.read(0, slice(None), columns) - generated).abs().max() > 1e-4


def test_memory_is_rows_times_keys(backend, eager):
    """A record holds one float per recorded row and key column, where the reference keeps
    layers x heads x queries x keys per step."""
    prompt = backend.prompts.prompt(backend.encode(image(5)), "Describe the image in detail.")
    keys = prompt.embeds.shape[1] + NEW_TOKENS
    record = AttentionRecord.of(backend.lm, 1, NEW_TOKENS, keys)
    assert record.nbytes == NEW_TOKENS * keys * 4
    out = eager_generate(eager, prompt.embeds)
    eager_bytes = sum(
        layer.numel() * layer.element_size() for step in out.attentions for layer in step
    )
    assert eager_bytes > 10 * record.nbytes


def test_recording_leaves_plain_sdpa(backend):
    """The registered attention is SDPA, recording or not: the same logits as the stock 'sdpa'."""
    tokenizer = backend.tokenizer
    plain = tiny_llava(len(tokenizer), seed=3)
    plain.set_attn_implementation({"text_config": "sdpa"})
    prompt = backend.prompts.prompt(backend.encode(image(6)), "Describe the image in detail.")
    length = prompt.embeds.shape[1]
    record = AttentionRecord.of(backend.lm, 1, 1, length)
    with torch.inference_mode():
        expected = plain(inputs_embeds=prompt.embeds).logits
        torch.testing.assert_close(backend.lm(inputs_embeds=prompt.embeds).logits, expected)
        recorded = backend.lm(inputs_embeds=prompt.embeds, attention_record=record).logits
        torch.testing.assert_close(recorded, expected)
    assert record.recorded() == 1 and record.maps.sum() > 0
