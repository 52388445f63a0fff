"""Checks every chat-template backend (models/chat_backend.py) must pass, shared by
test_qwen2_5_vl.py, test_llava_next.py and test_internvl.py.

Parity: the reference's read-out (eager generate(output_attentions=True) on the model's own
processor inputs, the newest query row over the image-token columns, mean over layers and
heads) against the recorder, batch of one and a left-padded batch of two decoded together.
Forced attention: a model whose every query attends to one chosen image token must put the
heat map's maximum inside that token's image region.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from images import random_rgb
from PIL import Image

NEW_TOKENS = 6
QUESTIONS = (
    "Describe the image in detail.",
    "What is on the table next to the red mug and the lamp?",
)


def image(seed, height, width):
    return random_rgb(height, width, seed)


def reference_maps(attentions, image_starts, n_image):
    """generate()'s eager attentions -> (B, T, n_image): per step and batch row, the newest query
    row over the image columns, mean over all layers and heads (the reference's reduction).
    A sliding-window layer's cache holds only the latest keys: its row is aligned to the
    sequence's columns by the step's full-attention layers (the longest rows), zeros before."""
    steps = []
    for step in attentions:
        length = max(layer.shape[-1] for layer in step)
        step = [F.pad(layer, (length - layer.shape[-1], 0)) for layer in step]
        per_row = [
            torch.stack([layer[b, :, -1, start : start + n_image] for layer in step]).mean(
                dim=(0, 1)
            )
            for b, start in enumerate(image_starts)
        ]
        steps.append(torch.stack(per_row))
    return torch.stack(steps, dim=1)


def processor_batch(backend, images, questions):
    """The model's own processor on chat texts and images, left-padded (the reference's inputs),
    with the backend's image options (e.g. Qwen's max_pixels, InternVL's tile counts)."""
    texts = [backend.prompts.chat_text(q) for q in questions]
    return backend.prompts.processor(
        images=[Image.fromarray(i) for i in images],
        text=texts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        **backend.prompts.layout.image_kwargs(),
    )


def generate(model, inputs, **options):
    with torch.inference_mode():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            **options,
        )


def image_starts(backend, input_ids):
    return [int((row == backend.prompts.image_token_id).nonzero()[0, 0]) for row in input_ids]


def check_batch_of_one(backend, eager, picture) -> float:
    """backend.generate == eager generate: same ids, same prompt, maps to 1e-5. Returns the max
    abs difference."""
    question = QUESTIONS[0]
    encoded = backend.encode(picture)
    ids, maps = backend.generate(encoded, question, NEW_TOKENS, stop_at_end=False)
    inputs = processor_batch(backend, [picture], [question])
    # the processor's prompt
    assert inputs.input_ids[0].tolist() == backend.prompts.prompt_token_ids(encoded, question)
    out = generate(eager, inputs, output_attentions=True)
    assert ids == out.sequences[0, -NEW_TOKENS:].tolist()
    prompt = backend.prompts.prompt(encoded, question)
    expected = prompt.on_grid(
        reference_maps(out.attentions, [prompt.image_start], prompt.n_image)[0]
    )
    rows, columns = backend.grid_of(encoded)
    assert maps.shape == expected.shape == (NEW_TOKENS, rows * columns)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    assert (
        maps[1:] - maps[:-1]
    ).abs().max() > 1e-4  # not a trivial agreement: maps differ per token
    return float((maps - expected).abs().max())


def check_left_padded_batch(backend, eager, pictures) -> float:
    """Two prompts of different lengths decoded together: each row equals eager generate on the
    processor's left-padded batch, and the row decoded alone. Returns the max abs difference."""
    inputs = processor_batch(backend, pictures, QUESTIONS)
    starts = image_starts(backend, inputs.input_ids)
    assert starts[0] != starts[1]
    n_image = int((inputs.input_ids[0] == backend.prompts.image_token_id).sum())
    out = generate(eager, inputs, output_attentions=True)
    expected = reference_maps(out.attentions, starts, n_image)
    encoded = [backend.encode(picture) for picture in pictures]
    together = backend.generate_batch(
        list(zip(encoded, QUESTIONS)), [NEW_TOKENS] * 2, [None] * 2, [None] * 2, stop_at_end=False
    )
    difference = 0.0
    for b, ((ids, maps), question) in enumerate(zip(together, QUESTIONS)):
        assert ids == out.sequences[b, -NEW_TOKENS:].tolist()
        prompt = backend.prompts.prompt(encoded[b], question)
        torch.testing.assert_close(maps, prompt.on_grid(expected[b]), atol=1e-5, rtol=0)
        difference = max(difference, float((maps - prompt.on_grid(expected[b])).abs().max()))
        alone_ids, alone = backend.generate(encoded[b], question, NEW_TOKENS, stop_at_end=False)
        assert alone_ids == ids
        torch.testing.assert_close(maps, alone, atol=1e-5, rtol=0)
    return difference


def force_attention_to_feature_zero(text_model, embed_tokens):
    """Every query of every layer scores keys by hidden dimension 0 alone, on the rotary pair with
    the lowest frequency (so positions barely turn it); nothing writes dimension 0 but the input
    embeddings, whose text rows get 0 there, and no value reads it. An image token whose feature
    has a large dimension 0 then takes (nearly) all attention."""
    with torch.no_grad():
        embed_tokens.weight[:, 0] = 0
        for layer in text_model.layers:
            attention = layer.self_attn
            head_dim = attention.head_dim
            # rotate_half pairs dims (i, i + head_dim / 2); the last i turns slowest
            pair = head_dim // 2 - 1
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
            n_heads = attention.q_proj.out_features // head_dim
            n_kv = attention.k_proj.out_features // head_dim
            for h in range(n_heads):
                attention.q_proj.bias[h * head_dim + pair] = 30.0
            for h in range(n_kv):
                attention.k_proj.weight[h * head_dim + pair, 0] = 30.0
            attention.v_proj.weight[:, 0] = (
                0  # the attended token adds (almost) nothing: answers stay wordy
            )
            attention.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0


def forced_model(tiny_processor, tiny_model, **options):
    """(processor, model): a tiny model (options to its builder) with its attention forced as
    above."""
    processor = tiny_processor()
    model = tiny_model(processor.tokenizer, seed=5, **options)
    force_attention_to_feature_zero(model.model.language_model, model.get_input_embeddings())
    return processor, model


def one_hot_features(n_image, hidden, index):
    features = torch.zeros(n_image, hidden)
    features[index, 0] = 50.0
    return features


def check_describe_and_refer(engine):
    """Both modes through the engine: heat maps and masks in the input image's pixels; refer
    mode's phrase is the expression's head noun."""
    result = engine.ground(image(7, 48, 80), "Describe the image in detail.")
    assert result.answer == engine.backend.decode(result.token_ids)
    assert not set(result.token_ids) & engine.backend.end_ids
    for phrase in result.phrases:
        assert phrase.heatmap.shape == (48, 80) and phrase.mask.shape == (48, 80)
    refer = engine.ground(image(7, 64, 40), "the red mug on the left", "refer")
    assert len(refer.phrases) == 1 and refer.phrases[0].heatmap.shape == (64, 40)
    root = engine.backend.decode([refer.token_ids[i] for i in refer.phrases[0].token_indices])
    assert root.strip() == "mug"


def check_directory_round_trip(engine, directory, layout_class, adjust=lambda backend: None):
    """The engine's model and processor saved as a Hugging Face directory load through LOADERS
    (config.json's model_type) and answer exactly alike; adjust(backend) sets what the loader
    does not read from the directory."""
    from groundlmm_ros.models.presets import build_engine

    engine.backend.lm.save_pretrained(directory)
    engine.backend.prompts.processor.save_pretrained(directory)
    loaded = build_engine(str(directory), refiner="threshold", max_new_tokens=24)
    assert isinstance(loaded.backend.prompts.layout, layout_class)
    adjust(loaded.backend)
    picture = image(8, 48, 80)
    expected, result = (
        engine.ground(picture, "Describe the image."),
        loaded.ground(picture, "Describe the image."),
    )
    assert result.token_ids == expected.token_ids
    for a, b in zip(result.phrases, expected.phrases):
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)


def check_teacher_forcing(backend):
    """Refer mode's one pass gives token t the row at position t - 1, as generation does."""
    encoded = backend.encode(image(4, 64, 32))
    ids, generated = backend.generate(encoded, QUESTIONS[0], NEW_TOKENS, stop_at_end=False)
    torch.testing.assert_close(
        backend.teacher_force(encoded, QUESTIONS[0], ids), generated, atol=1e-5, rtol=0
    )


def check_point_in_cell(engine, height, width, grid, cell):
    """Both modes: every phrase's point lies in grid cell (row, column) of the image, the grid
    stretched over the whole image."""
    rows, columns = grid
    for mode, query in (("describe", "Describe the image in detail."), ("refer", "the red mug")):
        result = engine.ground(image(6, height, width), query, mode)
        assert result.phrases
        for phrase in result.phrases:
            x, y = phrase.point
            assert cell[0] * height / rows <= y < (cell[0] + 1) * height / rows
            assert cell[1] * width / columns <= x < (cell[1] + 1) * width / columns


def parity_tests(label: str, tiny_model):
    """The parity tests of one backend, for its test module to bind by name: the eager twin
    (tiny_model(tokenizer, seed=3) on eager attention, as the module's `backend` fixture is
    built), batch of one, left-padded batch, teacher forcing. They print the figures (pytest -s)."""

    @pytest.fixture(scope="module")
    def eager(backend):
        model = tiny_model(backend.tokenizer, seed=3)
        model.set_attn_implementation("eager")
        return model

    def test_batch_of_one_matches_eager_generate(backend, eager):
        difference = check_batch_of_one(backend, eager, image(0, 40, 72))
        print(f"{label} parity, batch of one: max |recorder - eager| = {difference:.2e}")

    def test_left_padded_batch_matches_eager_generate(backend, eager):
        difference = check_left_padded_batch(backend, eager, [image(1, 40, 72), image(2, 40, 72)])
        print(
            f"{label} parity, left-padded batch of two: max |recorder - eager| = {difference:.2e}"
        )

    def test_teacher_forcing_reads_the_rows_generation_reads(backend):
        check_teacher_forcing(backend)

    return (
        eager,
        test_batch_of_one_matches_eager_generate,
        test_left_padded_batch_matches_eager_generate,
        test_teacher_forcing_reads_the_rows_generation_reads,
    )
