"""Per-stage latency of DiffLMM + attend-and-segment on a GPU, eager and fast side by side.

    python bench/gpu_latency.py            # DiffLMM-7B + SAM ViT-H, random weights, on cuda
    python bench/gpu_latency.py --tiny     # the same code paths with tiny models on CPU (CI)

Builds the real-shaped models directly on the device (no download, no checkpoint):
DiffLMM-7B from difflmm_7b_config() (SD v1.5 VAE + UNet, CLIP ViT-L/14-336, Vicuna-7B
shapes) and SAM ViT-H from segment_anything's builder. Two paths on 640x480 frames:

  eager: dynamic KV cache, SAM's image encoder in float32 after the LMM
  fast:  fixed-shape decoding (StaticCache, map rows in place; CUDA graphs on CUDA, captured
         by warm_up before the first query), SAM's encoder under bfloat16 autocast, started
         before the LMM, every phrase in one prompt call

and two modes: refer (encoder, the one teacher-forced pass, heat map, SAM) and describe
(encoder, prefill, --new-tokens decoded tokens; the end token is ignored so random weights
run the full length; heat maps and SAM for --phrases phrases). Each mode runs staged (the
device synchronised around each stage: where the time goes) and end to end (no inner
synchronisation: what a query costs, with the fast path's overlap). Figures are medians over
--repeats runs after one warm-up, each on a new frame (SAM embeds a repeated frame once).
The last line is JSON with every figure (ms), the peak GPU memory of each path, the graph
capture time, and the fast path's agreement with the eager one on a describe answer:
same_tokens and maps_max_abs_diff. spaCy's noun chunking is not timed (CPU, a few ms).

The prompt is tokenized by the tiny BPE tokenizer (the real Vicuna tokenizer is not
available without a download); its length is in the JSON ("prompt_tokens"), and the 576
image tokens dominate it either way.

On a GPU machine without internet access, bring the wheels the machine lacks (diffusers,
segment-anything, a transformers as new as requirements.txt's), e.g.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .whl diffusers==0.42.1 segment-anything==1.0 transformers==5.24.0
and there
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site python3 bench/gpu_latency.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "groundlmm_ros")
)  # the package, uninstalled

from segment_anything import sam_model_registry  # noqa: E402

from groundlmm_ros.engine import heatmap  # noqa: E402
from groundlmm_ros.engine.refiners import SamRefiner  # noqa: E402
from groundlmm_ros.models import tiny  # noqa: E402
from groundlmm_ros.models.difflmm import DiffLMMBackend, build_difflmm, difflmm_7b_config  # noqa: E402

QUESTION = "Describe the image in detail."
EXPRESSION = "the red mug on the table"
ENCODER_STAGES = ("preprocess", "clip", "vae", "unet", "projector")


class StageTimer:
    """Wall time per named stage; on CUDA the device is synchronised on both sides."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def build(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = tiny.tiny_tokenizer()
    start = time.perf_counter()
    if args.tiny:
        model = build_difflmm(tiny.tiny_difflmm_config(len(tokenizer)), dtype, device)
        sam = tiny.tiny_sam()
    else:
        model = build_difflmm(difflmm_7b_config(), dtype, device)
        with torch.device(device):
            sam = sam_model_registry["vit_h"]()
    sam = sam.to(device).eval()
    if args.compile:  # fixed shapes: compile once, reuse for every image
        tower = model.vision_tower
        tower.vae.encoder = torch.compile(tower.vae.encoder)
        tower.clip = torch.compile(tower.clip)
        # Block by block, so the feature hook on up_blocks[k] stays outside compiled code.
        unet = tower.unet
        for blocks in (unet.down_blocks, unet.up_blocks):
            for i, block in enumerate(blocks):
                blocks[i] = torch.compile(block)
        unet.mid_block = torch.compile(unet.mid_block)
    backend = DiffLMMBackend(model, tokenizer)
    backend.end_ids = set()  # fixed-length answers: random weights would stop anywhere
    refiners = {"eager": SamRefiner(sam, encoder_dtype=torch.float32), "fast": SamRefiner(sam)}
    StageTimer(device).sync()
    return backend, refiners, time.perf_counter() - start


class NoTimer(StageTimer):
    """End to end: no synchronisation inside the query."""

    @contextmanager
    def __call__(self, name: str):
        yield


def heat_maps(backend, maps: torch.Tensor, phrases: list[list[int]], image_size):
    """Engine.ground's heat-map step on the maps' device: normalise, combine per phrase (the
    default), un-pad, argmax; then the heat maps to the CPU for SAM and the messages."""
    grid = heatmap.normalise(maps.float().reshape(-1, *backend.grid))
    combined = torch.stack([heatmap.combine(grid, tokens) for tokens in phrases])
    heat = heatmap.upsample(combined, image_size, "pad")
    return list(heat.cpu().numpy()), [heatmap.argmax_point(h) for h in heat]


def run(backend, refiner, image, timer, mode, fast, new_tokens, n_phrases):
    """One query; returns the number of answer tokens. The fast path embeds the frame with SAM
    first (its own CUDA stream), as the engine does."""
    if fast:
        with timer("sam_image"):
            refiner.set_images([image])
    with timer("preprocess"):
        pixels = backend.preprocess(image)
    visual = backend.model.encode_image(pixels, stage=timer)[0]
    if mode == "refer":
        answer_ids = backend.encode_text(EXPRESSION)
        with timer("prefill"):
            maps = backend.teacher_force(visual, QUESTION, answer_ids)
        phrases = [[len(answer_ids) - 1]]
    else:
        arrivals = []  # on_token runs after int(argmax), which waits for the device
        timer.sync()
        start = time.perf_counter()
        answer_ids, maps = backend.generate(
            visual, QUESTION, new_tokens, on_token=lambda ids: arrivals.append(time.perf_counter())
        )
        timer.times["prefill"] = arrivals[0] - start
        timer.times["decode"] = arrivals[-1] - arrivals[0]
        timer.times["decode_per_token"] = timer.times["decode"] / max(len(answer_ids) - 1, 1)
        # Phrases of two tokens spread over the answer, as noun chunks would be.
        phrases = [[i, i + 1] for i in np.linspace(0, len(answer_ids) - 2, n_phrases).astype(int)]
    with timer("heatmaps"):
        heat, points = heat_maps(backend, maps, phrases, image.shape[:2])
    if not fast:
        with timer("sam_image"):
            refiner.set_images([image])
    with timer("sam_decode"):
        refiner.refine(0, heat, points)
    timer.sync()
    return len(answer_ids)


def median_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    names = runs[0].keys()
    figures = {f"{n}_ms": round(1000 * statistics.median(r[n] for r in runs), 3) for n in names}
    stages = [n for n in names if n not in ("decode_per_token",)]
    figures["total_ms"] = round(
        1000 * statistics.median(sum(r[n] for n in stages) for r in runs), 3
    )
    return figures


def measure(backend, refiner, frames, device, args, fast) -> dict:
    """Staged and end-to-end figures of both modes on one path."""
    results = {}
    for mode in ("refer", "describe"):
        staged, end_to_end = [], []
        for repeat, image in enumerate(
            frames
        ):  # the first run warms up (kernels, allocator, compile)
            timer = StageTimer(device)
            tokens = run(backend, refiner, image, timer, mode, fast, args.new_tokens, args.phrases)
            timer.sync()
            start = time.perf_counter()
            run(
                backend,
                refiner,
                image[::-1].copy(),
                NoTimer(device),
                mode,
                fast,
                args.new_tokens,
                args.phrases,
            )
            if repeat:
                staged.append(timer.times)
                end_to_end.append(time.perf_counter() - start)
        results[mode] = {
            **median_ms(staged),
            "end_to_end_ms": round(1000 * statistics.median(end_to_end), 3),
        }
        if mode == "describe":
            results[mode].update(new_tokens=tokens, phrases=args.phrases)
        figures = ", ".join(f"{k} {v:.1f}" for k, v in results[mode].items())
        print(f"{'fast' if fast else 'eager'} {mode}: {figures}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (seconds; CI)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument(
        "--dtype", default=None, help="default: float16 (the paper's), or float32 with --tiny"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--phrases", type=int, default=8, help="phrases grounded in describe mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the VAE encoder, CLIP and the UNet's blocks",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float32" if args.tiny else "float16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --tiny for the CPU run")
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)

    backend, refiners, build_s = build(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    base = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    frames = []
    for repeat in range(args.repeats + 1):  # a new frame per run: SAM embeds a repeated frame once
        frame = base.copy()
        frame[0, 0, 0] = repeat
        frames.append(frame)

    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": "tiny-difflmm" if args.tiny else "difflmm-7b (random weights)",
        "sam": "tiny" if args.tiny else "vit_h (random weights)",
        "dtype": args.dtype,
        "compile": args.compile,
        "repeats": args.repeats,
        "image": [480, 640],
        "build_s": round(build_s, 2),
        "weights_gib": round(weights_gib, 2) if cuda else None,
    }
    decodings = {"eager": "dynamic", "fast": "graphs" if cuda else "static"}
    for path, decoding in decodings.items():
        backend.decoding = decoding
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        backend.warm_up(QUESTION, args.new_tokens)
        StageTimer(device).sync()
        warm_up_ms = round(1000 * (time.perf_counter() - start), 3)
        summary[path] = {
            "decoding": decoding,
            "warm_up_ms": warm_up_ms,
            **measure(backend, refiners[path], frames, device, args, fast=path == "fast"),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if cuda
            else None,
        }

    # The fast path against the eager one on one describe answer.
    visual = backend.encode(frames[0])
    answers = {}
    for path, decoding in decodings.items():
        backend.decoding = decoding
        answers[path] = backend.generate(visual, QUESTION, args.new_tokens)
    (eager_ids, eager_maps), (fast_ids, fast_maps) = answers["eager"], answers["fast"]
    before, after = backend.prompt_ids(QUESTION)
    summary.update(
        prompt_tokens=len(before) + backend.grid[0] * backend.grid[1] + len(after),
        same_tokens=fast_ids == eager_ids,
        maps_max_abs_diff=float((fast_maps.float() - eager_maps.float()).abs().max())
        if fast_maps.shape == eager_maps.shape
        else None,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
