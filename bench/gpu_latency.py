"""Per-stage latency of DiffLMM + attend-and-segment on a GPU, with random weights.

    python bench/gpu_latency.py            # DiffLMM-7B (bf16) + SAM ViT-H, on cuda
    python bench/gpu_latency.py --tiny     # the same code paths with tiny models on CPU (CI)

Builds the real-shaped models directly on the device (no download, no checkpoint):
DiffLMM-7B from difflmm_7b_config() (SD v1.5 VAE + UNet, CLIP ViT-L/14-336, Vicuna-7B
shapes) and SAM ViT-H from segment_anything's builder. Then, on one 640x480 image:

  refer:    preprocess, clip (+ captioner), vae (+ noise), unet, projector, prefill (the one
            teacher-forced pass with the recorder on), heatmaps, sam_image, sam_decode
  describe: the same encoder stages, prefill, decode per token for a fixed-length answer
            (--new-tokens, default 64; the end token is ignored so random weights run the
            full length), heat maps and SAM decoding for --phrases phrases

Each figure is the median over --repeats runs after one warm-up; GPU stages are
bracketed by torch.cuda.synchronize(). The last line is JSON with every figure (ms) and
the peak GPU memory. spaCy's noun chunking is not timed (CPU, a few ms; the GPU machine
lacks spaCy), nor is the random answer decoded: its ids are not words of the tokenizer.

The prompt is tokenized by the tiny BPE tokenizer (the real Vicuna tokenizer is not
available without a download); its length is in the JSON ("prompt_tokens"), and the 576
image tokens dominate it either way.

On the GPU machine (no internet; its image lacks diffusers and segment-anything, and its
transformers, 5.17 when last listed, is older than this venv's): carry wheels, as
/work/.library/device/README.md describes. Here, in the repo root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .whl diffusers==0.42.1 segment-anything==1.0 transformers==5.24.0
and as the device command (carry [".whl"], timeout_s ~480):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 &&
    python3 bench/gpu_latency.py 2>&1 | tee $OUT/gpu_latency.log
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
        with torch.device(device):  # SAM in float32, as the reference runs it
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
    timer = StageTimer(device)
    timer.sync()
    return backend, SamRefiner(sam), time.perf_counter() - start


def heat_maps(backend, maps: torch.Tensor, phrases: list[list[int]], image_size):
    """Engine.ground's heat-map step: normalise, combine per phrase (the default), un-pad,
    argmax."""
    grid = heatmap.normalise(maps.float().cpu().reshape(-1, *backend.grid))
    combined = torch.stack([heatmap.combine(grid, tokens) for tokens in phrases])
    heat = heatmap.upsample(combined, image_size, "pad")
    return heat, [heatmap.argmax_point(h) for h in heat]


def encode(backend, image, timer):
    with timer("preprocess"):
        pixels = backend.preprocess(image)
    return backend.model.encode_image(pixels, stage=timer)[0]


def run_refer(backend, refiner, image, timer):
    visual = encode(backend, image, timer)
    answer_ids = backend.tokenizer(EXPRESSION, add_special_tokens=False).input_ids
    with timer("prefill"):
        maps = backend.teacher_force(visual, QUESTION, answer_ids)
    with timer("heatmaps"):
        heat, points = heat_maps(backend, maps, [[len(answer_ids) - 1]], image.shape[:2])
    with timer("sam_image"):
        refiner.set_image(image)
    with timer("sam_decode"):
        refiner.refine(heat[0], points[0])


def run_describe(backend, refiner, image, timer, new_tokens, n_phrases):
    visual = encode(backend, image, timer)
    arrivals = []  # on_token runs after int(argmax), which waits for the GPU

    def on_token(ids):
        arrivals.append(time.perf_counter())

    timer.sync()
    start = time.perf_counter()
    ids, maps = backend.generate(visual, QUESTION, new_tokens, on_token=on_token)
    timer.times["prefill"] = arrivals[0] - start
    timer.times["decode"] = arrivals[-1] - arrivals[0]
    timer.times["decode_per_token"] = timer.times["decode"] / max(len(ids) - 1, 1)
    # Phrases of two tokens spread over the answer, as noun chunks would be.
    phrases = [[i, i + 1] for i in np.linspace(0, len(ids) - 2, n_phrases).astype(int)]
    with timer("heatmaps"):
        heat, points = heat_maps(backend, maps, phrases, image.shape[:2])
    with timer("sam_image"):
        refiner.set_image(image)
    with timer("sam_decode"):
        for h, p in zip(heat, points):
            refiner.refine(h, p)
    return len(ids)


def median_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    names = runs[0].keys()
    figures = {f"{n}_ms": round(1000 * statistics.median(r[n] for r in runs), 3) for n in names}
    stages = [n for n in names if n not in ("decode_per_token",)]
    figures["total_ms"] = round(
        1000 * statistics.median(sum(r[n] for n in stages) for r in runs), 3
    )
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (seconds; CI)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--dtype", default=None, help="default: bfloat16, or float32 with --tiny")
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
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --tiny for the CPU run")
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)

    backend, refiner, build_s = build(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)

    results = {}
    for mode in ("refer", "describe"):
        runs = []
        for repeat in range(
            args.repeats + 1
        ):  # the first run warms up (kernels, allocator, compile)
            timer = StageTimer(device)
            if mode == "refer":
                run_refer(backend, refiner, image, timer)
            else:
                generated = run_describe(
                    backend, refiner, image, timer, args.new_tokens, args.phrases
                )
            if repeat:
                runs.append(timer.times)
        results[mode] = median_ms(runs)
        print(f"{mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[mode].items()), flush=True)
    results["describe"]["new_tokens"] = generated
    results["describe"]["phrases"] = args.phrases

    before, after = backend.prompt_ids(QUESTION)
    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": "tiny-difflmm" if args.tiny else "difflmm-7b (random weights)",
        "sam": "tiny" if args.tiny else "vit_h (random weights, float32)",
        "dtype": args.dtype,
        "compile": args.compile,
        "repeats": args.repeats,
        "image": list(image.shape[:2]),
        "prompt_tokens": len(before) + backend.grid[0] * backend.grid[1] + len(after),
        "build_s": round(build_s, 2),
        "weights_gib": round(weights_gib, 2) if cuda else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if cuda
        else None,
        **results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
