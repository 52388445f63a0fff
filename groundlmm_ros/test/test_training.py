"""The demo model's training command runs end to end on a tiny budget (so it cannot rot),
and what it writes is a model directory the engine loads and runs in both modes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.training.recipe import DESCRIBE_QUESTION, demo_tokenizer
from groundlmm_ros.world import make_scenes


@pytest.mark.timeout(240)
def test_train_command_on_a_tiny_budget(tmp_path):
    budget = ["--scenes", "40", "--vae-steps", "2", "--denoiser-steps", "2", "--caption-steps", "3",
              "--batch-size", "4", "--checkpoint-every", "3", "--validation-scenes", "2"]

    def train(out):
        run = subprocess.run([sys.executable, "-m", "groundlmm_ros.cli", "train", "--output", str(out), *budget],
                             capture_output=True, text=True, env=os.environ.copy())
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run

    out = tmp_path / "model"
    run = train(out)
    # Fixed seeds: a second run in a fresh process writes the same weights, bit for bit.
    train(tmp_path / "again")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    for stage in ("vae 2/2", "denoiser 2/2", "captioning 1/3", "validation step 3", "saved step 3"):
        assert stage in run.stdout, f"no {stage!r} in the progress output"
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["budget"]["caption_steps"] == 3
    assert json.loads((out / "training.json").read_text()) == summary

    engine = build_engine(str(out), refiner="threshold")
    scene = make_scenes(1, seed=5)[0]
    refer = engine.ground(scene.image, "the red circle", mode="refer")
    assert refer.answer == "the red circle" and len(refer.phrases) == 1
    assert refer.phrases[0].mask.shape == scene.image.shape[:2]
    describe = engine.ground(scene.image, DESCRIBE_QUESTION, mode="describe", max_new_tokens=5)
    assert 1 <= len(describe.token_ids) <= 5


def test_tokenizer_is_spacing_independent_and_round_trips():
    tokenizer = demo_tokenizer()
    caption = "there is a red circle, an orange star and the blue heart."
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == caption
    assert tokenizer(" The  red\ncircle", add_special_tokens=False).input_ids == \
        tokenizer("the red circle", add_special_tokens=False).input_ids
    assert tokenizer("a red circle").input_ids[0] == tokenizer.bos_token_id
    assert np.unique(ids).size == len(set(caption.replace(",", " ,").replace(".", " .").split()))
