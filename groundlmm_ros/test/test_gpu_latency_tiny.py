"""bench/gpu_latency.py --tiny: the GPU benchmark's code paths, on CPU with tiny models,
as a subprocess; its last line is JSON with every stage of both modes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_latency.py"
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


def test_tiny_run_reports_every_stage_in_json():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - start < 60
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["peak_gpu_memory_gib"] is None
    assert result["prompt_tokens"] > 64  # 8x8 image tokens plus the template
    for mode in ("refer", "describe"):
        figures = result[mode]
        for stage in STAGES:
            assert figures[f"{stage}_ms"] > 0, (mode, stage)
        stages = STAGES + (["decode"] if mode == "describe" else [])
        assert abs(figures["total_ms"] - sum(figures[f"{s}_ms"] for s in stages)) < 0.01 * len(
            stages
        )
    describe = result["describe"]
    assert describe["new_tokens"] == 64 and describe["phrases"] == 8
    assert abs(describe["decode_per_token_ms"] * 63 - describe["decode_ms"]) < 0.1
