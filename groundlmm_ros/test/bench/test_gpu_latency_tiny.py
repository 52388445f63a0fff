"""bench/gpu_latency.py --tiny: the GPU benchmark's code paths, eager and fast, on CPU with
tiny models, as a subprocess; its last line is JSON with every stage of both modes and the
fast path's agreement with the eager one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[3] / "bench" / "gpu_latency.py"
STAGES = [
    "preprocess",
    "clip",
    "vae",
    "unet",
    "projector",
    "prefill",
    "heatmaps",
    "sam_image",
    "sam_decode",
]


def test_tiny_run_reports_both_paths_and_their_parity():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["prompt_tokens"] > 64  # 8x8 image tokens + template
    # The fast path (here: the static cache; CUDA graphs need a GPU) answers as the eager one.
    assert result["same_tokens"] is True and result["maps_max_abs_diff"] < 1e-5
    assert (result["eager"]["decoding"], result["fast"]["decoding"]) == ("dynamic", "static")
    for path in ("eager", "fast"):
        assert result[path]["peak_gpu_memory_gib"] is None and result[path]["warm_up_ms"] >= 0
        for mode in ("refer", "describe"):
            figures = result[path][mode]
            for stage in STAGES:
                assert figures[f"{stage}_ms"] > 0, (path, mode, stage)
            stages = STAGES + (["decode"] if mode == "describe" else [])
            total = sum(figures[f"{s}_ms"] for s in stages)
            assert abs(figures["total_ms"] - total) < 0.01 * len(stages)
            assert figures["end_to_end_ms"] > 0
        describe = result[path]["describe"]
        assert describe["new_tokens"] == 64 and describe["phrases"] == 8
        assert abs(describe["decode_per_token_ms"] * 63 - describe["decode_ms"]) < 0.1
