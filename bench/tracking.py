"""Ground once, track every frame, engine-level (no ROS): per camera, for 1 and 4 cameras,
tracked results/s, grounded results/s, latency frame -> tracked result (p50, p95) and the
tracker's memory after the run.

    python bench/tracking.py [--frames 1000] [--cameras 1 4] [--device cpu]
    python bench/tracking.py --sam2 sam2.1-large --device cuda     # random weights, GPU

Each camera plays its own synthetic sequence (world/sequences.py: three shapes moving,
occluding each other, 640 x 480, `--fps` frame clock) with a standing refer query naming one of
them. Per step every camera has a new frame; all cameras' frames are tracked (SAM 2: one
encoder batch, track_batch), then each camera whose grounding is due (TrackSet: its period on
the frame clock, or a weak or lost track) is grounded by the demo model on that frame and its
tracker seeded. Latency: the step's start (the frames' arrival) -> that camera's tracked
result, so it holds the other cameras' tracking of the step but not the groundings, which a
node runs on its worker. Rates: results over the seconds spent tracking and grounding (the
frames' rendering left out), per camera.

--sam2 SIZE: a TRACKERS preset with random weights instead of the colour tracker. Random
weights find nothing, so SAM 2 is seeded every `--reground-period-s` with the sequence's true
masks (the demo model's grounding is still run and timed) and tracks every frame whatever it
reports: the figures are its speed and memory, not its accuracy.
Accuracy (colour tracker only, `--sequences N`, 0 to skip): N random 60-frame sequences at the
demo model's 128 x 128, a standing refer query naming the first shape, mean IoU of its tracked
mask against the true one over the frames: (a) the tracker alone, seeded once with the true
mask; (b) the whole loop, grounded by the demo model (TrackSet, re-grounded every 0.7 s), and
how many sequences kept one track id throughout.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from groundlmm_ros.engine.trackers import ColourTracker
from groundlmm_ros.engine.tracking import TrackSet, ground_and_track
from groundlmm_ros.models.presets import build_engine, build_sam2_video
from groundlmm_ros.models.sam2_tracker import Sam2Tracker, track_batch
from groundlmm_ros.world.sequences import Sequence, random_movers

SIZE = (480, 640)


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def run(engine, cameras: int, args, sam2=None) -> dict:
    sequences = [
        Sequence(random_movers(np.random.default_rng(c), 3, SIZE), SIZE, seed=c)
        for c in range(cameras)
    ]
    queries = [f"the {s.movers[0].name}" for s in sequences]
    if sam2 is None:
        tracks = [TrackSet(ColourTracker(), args.reground_period_s) for _ in sequences]
    else:
        trackers = [Sam2Tracker(*sam2) for _ in sequences]
        last_seed = [None] * cameras
    tracked, grounded = [0] * cameras, [0] * cameras
    latencies: list[float] = []
    # Seconds of tracking and grounding (the frames' rendering is not counted).
    seconds = 0.0
    for t in range(args.frames):
        stamp = t / args.fps
        frames = [s.frame(t) for s in sequences]
        arrival = time.perf_counter()
        if sam2 is None:
            for c, (ts, frame) in enumerate(zip(tracks, frames)):
                if ts.tracking:
                    tracked[c] += len(ts.track(stamp, frame.image)) > 0
                    latencies.append(time.perf_counter() - arrival)
        else:
            ready = [c for c in range(cameras) if last_seed[c] is not None]
            if ready:
                track_batch([trackers[c] for c in ready], [frames[c].image for c in ready])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                done = time.perf_counter() - arrival
                latencies += [done] * len(ready)
                for c in ready:
                    tracked[c] += 1
        for c, frame in enumerate(frames):
            if sam2 is None:
                if not tracks[c].grounding_due(stamp):
                    continue
                tracks[c].grounding_started(stamp)
                grounding = engine.ground(frame.image, queries[c], "refer")
                masks = [p.mask for p in grounding.phrases]
                tracks[c].grounded(stamp, frame.image, masks, [p.text for p in grounding.phrases])
            else:
                if last_seed[c] is not None and stamp - last_seed[c] < args.reground_period_s:
                    continue
                engine.ground(frame.image, queries[c], "refer")
                present = [m for m in frame.masks if m.any()]
                trackers[c].seed(frame.image, present, list(range(1, len(present) + 1)))
                last_seed[c] = stamp
            grounded[c] += 1
        seconds += time.perf_counter() - arrival
    memory = [x.memory() for x in ([ts.tracker for ts in tracks] if sam2 is None else trackers)]
    p50, p95 = percentiles(latencies)
    return {
        "tracked_per_s_per_camera": round(float(np.mean(tracked)) / seconds, 2),
        "grounded_per_s_per_camera": round(float(np.mean(grounded)) / seconds, 2),
        "latency_ms_p50": round(p50 * 1e3, 2),
        "latency_ms_p95": round(p95 * 1e3, 2),
        "memory_frames_max": max(m.frames for m in memory),
        "memory_bytes_max": max(m.tensor_bytes for m in memory),
        "seconds": round(seconds, 1),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def accuracy(engine, count: int) -> dict:
    alone, loop, one_id = [], [], 0
    for seed in range(count):
        sequence = Sequence(random_movers(np.random.default_rng(seed), 3), seed=seed)
        frames = [sequence.frame(t) for t in range(60)]
        tracker = ColourTracker()
        tracker.seed(frames[0].image, [frames[0].masks[0]], [1])
        alone.append(np.mean([iou(tracker.track(f.image)[1].mask, f.masks[0]) for f in frames]))
        tracks, query = TrackSet(ColourTracker(), 0.7), f"the {sequence.movers[0].name}"
        ious, ids = [], set()
        for t, f in enumerate(frames):
            live = [
                o
                for o in ground_and_track(engine, tracks, query, "refer", t / 30, f.image).objects
                if not o.lost
            ]
            ious.append(iou(live[0].mask, f.masks[0]) if live else 0.0)
            ids |= {o.track_id for o in live}
        loop.append(np.mean(ious))
        one_id += len(ids) == 1
    return {
        "sequences": count,
        "iou_tracker_alone": round(float(np.mean(alone)), 3),
        "iou_grounded_loop": round(float(np.mean(loop)), 3),
        "iou_grounded_loop_median": round(float(np.median(loop)), 3),
        "one_track_id": one_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--reground-period-s", type=float, default=2.0)
    parser.add_argument("--sam2", default="", help="a TRACKERS preset, with random weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine("demo", device=args.device)
    sam2 = build_sam2_video(args.sam2, args.device, random_weights=True) if args.sam2 else None
    report = {
        "tracker": args.sam2 or "colour",
        "grounding": "demo",
        "device": args.device,
        "frames": args.frames,
        "image": f"{SIZE[1]}x{SIZE[0]}",
        "fps": args.fps,
        "reground_period_s": args.reground_period_s,
    }
    for cameras in args.cameras:
        report[f"{cameras}_cameras"] = run(engine, cameras, args, sam2)
        print(f"{cameras} camera(s): {report[f'{cameras}_cameras']}", flush=True)
    if args.sequences and not args.sam2:
        report["accuracy"] = accuracy(engine, args.sequences)
        print(f"accuracy: {report['accuracy']}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
