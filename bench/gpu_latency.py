"""Per-stage latency of DiffLMM + attend-and-segment on a GPU, eager and fast side by side,
and what N cameras' batched steps give against one camera's.

    python bench/gpu_latency.py --cameras 4   # DiffLMM-7B + SAM ViT-H, random weights, on cuda
    python bench/gpu_latency.py --tiny --cameras 4   # the same code paths, tiny models, CPU (CI)
    bench/gpu_check.sh                        # the prepared GPU run (wheels, compile on)

Builds the real-shaped models directly on the device (no download, no checkpoint):
DiffLMM-7B from difflmm_7b_config() (SD v1.5 VAE + UNet, CLIP ViT-L/14-336, Vicuna-7B
shapes) and SAM ViT-H from segment_anything's builder. Two paths on 640x480 frames:

  eager: the decoder's per-token step run eagerly (no CUDA graph, not compiled), SAM's image
         encoder in float32 after the LMM
  fast:  the step captured as a CUDA graph per bucket on CUDA (warm_up, before the first
         query), torch.compile'd with --compile (auto: on for CUDA); SAM's encoder under
         bfloat16 autocast, every phrase of a frame in one prompt call

and two modes: refer (encoder, the one teacher-forced pass, heat map, SAM) and describe
(encoder, prefill, --new-tokens decoded tokens; the end token is ignored so random weights
run the full length; heat maps and SAM for --phrases phrases). Each mode runs staged (the
device synchronised around each stage: where the time goes) and end to end (no inner
synchronisation: what a query costs, with the fast path's overlap). Figures are medians over
--repeats runs after one warm-up, each on a new frame (SAM embeds a repeated frame once).
Then, per path, --cameras N frames as the node's batched step takes them (one encoder call,
one teacher-forced pass or one decoding pass per token for all, then each camera's heat maps and
SAM) against one frame: results per second in describe and refer and their ratio; decode
ms/token at B=1 and B=N; the weight-read bound (the LM's weight bytes at the bandwidth of a
measured device-to-device copy) and the B=1 step's ratio to it.
The last line is JSON with every figure (ms), the peak GPU memory of each path, the warm-up
(capture + compile) seconds, and the parity keys: the fast path's agreement with the eager one
on describe answers of 1..N rows (per batch size: same_tokens and maps_max_abs_diff; the
top-level same_tokens and maps_max_abs_diff over all of them). spaCy's noun chunking is not
timed (CPU, a few ms).

The prompt is tokenized by the tiny BPE tokenizer (the real Vicuna tokenizer is not
available without a download); its length is in the JSON ("prompt_tokens"), and the 576
image tokens dominate it either way.

On a GPU machine without internet access, bring the wheels the machine lacks (diffusers,
segment-anything, a transformers as new as requirements.txt's, and its regex), e.g.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .whl diffusers==0.42.1 segment-anything==1.0 \
        transformers==5.24.0 regex
and there run bench/gpu_check.sh (it installs .whl/*.whl into /tmp/site and runs this).
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

# the package, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "groundlmm_ros"))

from segment_anything import sam_model_registry  # noqa: E402

from groundlmm_ros.engine import heatmap  # noqa: E402
from groundlmm_ros.engine.refiners import SamRefiner  # noqa: E402
from groundlmm_ros.models import tiny  # noqa: E402
from groundlmm_ros.models.difflmm import build_difflmm, difflmm_7b_config, difflmm_backend  # noqa: E402

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
    if args.compile_encoder:  # fixed shapes: compile once, reuse for every image
        tower = model.vision_tower
        tower.vae.encoder = torch.compile(tower.vae.encoder)
        tower.clip = torch.compile(tower.clip)
        # Block by block, so the feature hook on up_blocks[k] stays outside compiled code.
        unet = tower.unet
        for blocks in (unet.down_blocks, unet.up_blocks):
            for i, block in enumerate(blocks):
                blocks[i] = torch.compile(block)
        unet.mid_block = torch.compile(unet.mid_block)
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    backends = {
        # The eager path: the same decoder without a graph or compiled step.
        "eager": difflmm_backend(model, tokenizer, graphs=False),
        "fast": difflmm_backend(model, tokenizer, compile=compile),
    }
    for backend in backends.values():
        backend.end_ids = set()  # fixed-length answers: random weights would stop anywhere
    refiners = {"eager": SamRefiner(sam, encoder_dtype=torch.float32), "fast": SamRefiner(sam)}
    StageTimer(device).sync()
    return backends, refiners, time.perf_counter() - start


class NoTimer(StageTimer):
    """End to end: no synchronisation inside the query."""

    @contextmanager
    def __call__(self, name: str):
        yield


def heat_maps(backend, maps: torch.Tensor, phrases: list[list[int]], image_size):
    """Engine.ground's heat-map step on the maps' device: normalise, combine per phrase (the
    default), un-pad, argmax; then the heat maps to the CPU for SAM and the messages."""
    grid = heatmap.normalise(maps.float().reshape(-1, *backend.prompts.grid))
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
        pixels = backend.prompts.preprocess(image)
    visual = backend.prompts.encoder.encode_image(pixels, stage=timer)[0]
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


def cameras_step(backend, refiner, images, mode, new_tokens, n_phrases) -> None:
    """One batched step of the node for `images` (one per camera), end to end."""
    visual = backend.encode_batch(images)
    if mode == "refer":
        answer_ids = backend.encode_text(EXPRESSION)
        maps = backend.teacher_force_batch(QUESTION, [(v, answer_ids) for v in visual])
        phrases = [[len(answer_ids) - 1]]
    else:
        n = len(images)
        answers = backend.generate_batch(
            [(v, QUESTION) for v in visual], [new_tokens] * n, [None] * n, [None] * n
        )
        maps = [answer_maps for _, answer_maps in answers]
        spread = np.linspace(0, new_tokens - 2, n_phrases).astype(int)
        phrases = [[i, i + 1] for i in spread]
    # The step's frames through SAM's encoder together, then each frame's phrases in one call.
    refiner.set_images(images)
    for i, (image, image_maps) in enumerate(zip(images, maps)):
        heat, points = heat_maps(backend, image_maps, phrases, image.shape[:2])
        refiner.refine(i, heat, points)


def decode_ms_per_token(backend, images, new_tokens) -> float:
    """Decoding alone, all rows together: ms per step after the first token."""
    arrivals = []
    n = len(images)
    backend.generate_batch(
        [(v, QUESTION) for v in backend.encode_batch(images)],
        [new_tokens] * n,
        [lambda ids: arrivals.append(time.perf_counter())] + [None] * (n - 1),
        [None] * n,
    )
    return 1000 * (arrivals[-1] - arrivals[0]) / max(len(arrivals) - 1, 1)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (read + write) of 256 MiB (64 on a CPU)."""
    source = torch.ones(2**28 if device.type == "cuda" else 2**26, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    timer = StageTimer(device)
    target.copy_(source)
    timer.sync()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    timer.sync()
    return 2 * 10 * source.numel() / (time.perf_counter() - start)


def compare_cameras(backend, refiner, frames, device, args) -> dict:
    """Results per second of one camera against N cameras' batched steps, decode ms/token at B=1
    and B=N, and the B=1 step against the weight-read bound."""
    figures = {}
    n = args.cameras
    for mode in ("refer", "describe"):
        seconds = {}
        for count in (1, n):
            runs = []
            for repeat in range(args.repeats + 1):
                images = [
                    f[::-1].copy() if repeat % 2 else f for f in frames[repeat : repeat + count]
                ]
                StageTimer(device).sync()
                start = time.perf_counter()
                cameras_step(backend, refiner, images, mode, args.new_tokens, args.phrases)
                StageTimer(device).sync()
                if repeat:  # the first run warms up
                    runs.append(time.perf_counter() - start)
            seconds[count] = statistics.median(runs)
        one, many = 1 / seconds[1], n / seconds[n]
        figures[mode] = {
            "one_camera_results_per_s": round(one, 3),
            f"{n}_cameras_results_per_s": round(many, 3),
            "speedup": round(many / one, 3),
        }
    weight_bytes = sum(p.numel() * p.element_size() for p in backend.lm.parameters())
    bound_ms = 1000 * weight_bytes / copy_bandwidth(device)
    decode = {b: decode_ms_per_token(backend, frames[:b], args.new_tokens) for b in (1, n)}
    figures.update(
        {
            "decode_ms_per_token_b1": round(decode[1], 3),
            f"decode_ms_per_token_b{n}": round(decode[n], 3),
            "weight_read_bound_ms": round(bound_ms, 5),
            "b1_to_bound_ratio": round(decode[1] / bound_ms, 3),
        }
    )
    return figures


def parity(backends, frames, args) -> dict:
    """The fast path's describe answers against the eager path's, for 1..N rows."""
    by_batch = {}
    for b in range(1, args.cameras + 1):
        answers = {}
        for path, backend in backends.items():
            visual = backend.encode_batch(frames[:b])
            answers[path] = backend.generate_batch(
                [(v, QUESTION) for v in visual], [args.new_tokens] * b, [None] * b, [None] * b
            )
        same = all(f[0] == e[0] for f, e in zip(answers["fast"], answers["eager"]))
        difference = max(
            float((f[1].float() - e[1].float()).abs().max())
            if f[1].shape == e[1].shape
            else float("inf")
            for f, e in zip(answers["fast"], answers["eager"])
        )
        by_batch[str(b)] = {"same_tokens": same, "maps_max_abs_diff": difference}
        print(f"parity B={b}: same tokens {same}, max map difference {difference:.2e}", flush=True)
    return by_batch


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
        # The first run warms up (kernels, allocator, compile).
        for repeat, image in enumerate(frames[: args.repeats + 1]):
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
    parser.add_argument("--cameras", type=int, default=1, help="cameras of one batched step")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the fast path's decoder step under torch.compile (auto: on for CUDA)",
    )
    parser.add_argument(
        "--compile-encoder",
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

    backends, refiners, build_s = build(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    base = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    frames = []
    # A new frame per run (SAM embeds a repeated frame once), enough for N cameras' runs.
    for repeat in range(args.repeats + args.cameras + 1):
        frame = base.copy()
        frame[0, 0, 0] = repeat
        frames.append(frame)

    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": "tiny-difflmm" if args.tiny else "difflmm-7b (random weights)",
        "sam": "tiny" if args.tiny else "vit_h (random weights)",
        "dtype": args.dtype,
        "compile": backends["fast"].decoder.compile,
        "compile_encoder": args.compile_encoder,
        "cameras": args.cameras,
        "repeats": args.repeats,
        "image": [480, 640],
        "build_s": round(build_s, 2),
        "weights_gib": round(weights_gib, 2) if cuda else None,
    }
    for path, backend in backends.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        backend.warm_up(QUESTION, args.new_tokens, list(range(1, args.cameras + 1)))
        StageTimer(device).sync()
        warm_up_s = round(time.perf_counter() - start, 3)
        print(f"{path} warm-up (capture + compile): {warm_up_s:.1f} s", flush=True)
        figures = measure(backend, refiners[path], frames, device, args, fast=path == "fast")
        cameras = compare_cameras(backend, refiners[path], frames, device, args)
        print(f"{path} cameras: {json.dumps(cameras)}", flush=True)
        summary[path] = {
            "graphs": backend.decoder.graphs,
            "compile": backend.decoder.compile,
            "warm_up_s": warm_up_s,
            **figures,
            "cameras": cameras,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if cuda
            else None,
        }

    by_batch = parity(backends, frames, args)
    backend = backends["fast"]
    before, after = backend.prompts.prompt_ids(QUESTION)
    summary.update(
        prompt_tokens=len(before) + backend.prompts.grid[0] * backend.prompts.grid[1] + len(after),
        parity=by_batch,
        same_tokens=all(p["same_tokens"] for p in by_batch.values()),
        maps_max_abs_diff=max(p["maps_max_abs_diff"] for p in by_batch.values()),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
