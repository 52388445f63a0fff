"""What limits the demo model's describe recall: how well its captions name shapes, and how
much shape its visual features carry.

    python bench/shape_probe.py [--model demo|DIR] [--scenes 100] [--probe-scenes 3000]

1. Captions: `describe` on the first --scenes held-out scenes (colour refiner): objects named
   with the right colour AND shape, objects whose colour is said with a wrong shape, the same
   for one-object scenes, and how many of the named ones the phrase's point hits.
2. Features: a small MLP probe (seeded; 80% of objects to train, 20% held out) predicts an
   object's shape (5 classes, chance 0.2) from the frozen tower's outputs around it: the 3 x 3
   token neighbourhood of its centre (UNet features, CLIP patch tokens, projected visual
   tokens), and the mean over the tokens it covers (CLIP, projected: roughly what one
   attention read gives the Llama). Scenes from a seed used by neither training nor evaluation.
The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# the package, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "groundlmm_ros"))

from groundlmm_ros.engine.engine import GCG_QUESTION  # noqa: E402
from groundlmm_ros.evaluation import held_out_scenes, phrase_names, point_in_mask  # noqa: E402
from groundlmm_ros.models.presets import build_engine  # noqa: E402
from groundlmm_ros.training.recipe import SCENE_SIZE  # noqa: E402
from groundlmm_ros.training.train import tower_features  # noqa: E402
from groundlmm_ros.world import SHAPES, make_scenes  # noqa: E402

PROBE_SEED = 7


def caption_figures(engine, count: int) -> dict:
    named = colour_only = pointed = single = single_named = total = 0
    for scene in held_out_scenes(count):
        phrases = engine.ground(scene.image, GCG_QUESTION, mode="describe").phrases
        for obj in scene.objects:
            hits = [p for p in phrases if phrase_names(p.text, obj)]
            named += bool(hits)
            pointed += any(point_in_mask(p.point, obj.mask) for p in hits)
            colour_only += not hits and any(obj.colour in p.text.lower().split() for p in phrases)
            single += len(scene.objects) == 1
            single_named += len(scene.objects) == 1 and bool(hits)
            total += 1
    return {
        "objects": total,
        "named": named,
        "colour_right_shape_wrong": colour_only,
        "named_and_pointed": pointed,
        "single_object_scenes": single,
        "single_object_named": single_named,
    }


def probe_accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy of a 2-layer MLP on standardised features (80/20 split)."""
    torch.manual_seed(0)
    cut = int(0.8 * len(y))
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-5)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, len(SHAPES))
    )
    optimiser = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(1500):
        index = torch.randint(cut, (128,))
        loss = F.cross_entropy(net(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float((net(x[cut:]).argmax(1) == y[cut:]).float().mean())


def feature_figures(backend, count: int) -> dict:
    model = backend.prompts.encoder
    scenes = make_scenes(count, seed=PROBE_SEED, size=SCENE_SIZE)
    pixels = torch.cat([backend.prompts.preprocess(s.image) for s in scenes])
    unet, clip = tower_features(model, pixels)  # (n, C, G, G), (n, G*G, C_clip)
    with torch.no_grad():
        projected = model.mm_projector(unet, clip)  # (n, G*G, hidden)
    grid = unet.shape[-1]
    cell = SCENE_SIZE // grid
    # each (n, C, G, G)
    maps = {
        "unet": unet,
        "clip": clip.transpose(1, 2).unflatten(2, (grid, grid)),
        "projected": projected.transpose(1, 2).unflatten(2, (grid, grid)),
    }
    features = {f"{name}_3x3": [] for name in maps} | {"clip_mean": [], "projected_mean": []}
    shapes = []
    for k, scene in enumerate(scenes):
        for obj in scene.objects:
            row = min(grid - 2, max(1, obj.centre[1] // cell))
            column = min(grid - 2, max(1, obj.centre[0] // cell))
            for name, m in maps.items():
                features[f"{name}_3x3"].append(
                    m[k, :, row - 1 : row + 2, column - 1 : column + 2].flatten()
                )
            cover = torch.from_numpy(
                obj.mask.reshape(grid, cell, grid, cell).mean(axis=(1, 3))
            ).flatten()
            weights = (cover > 0.3).float() if cover.max() > 0.3 else (cover == cover.max()).float()
            for name in ("clip", "projected"):
                tokens = maps[name][k].flatten(1).T  # (G*G, C)
                features[f"{name}_mean"].append((tokens * weights[:, None]).sum(0) / weights.sum())
            shapes.append(SHAPES.index(obj.shape))
    y = torch.tensor(shapes)
    return {name: round(probe_accuracy(torch.stack(xs), y), 3) for name, xs in features.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="demo", help="the demo preset or a directory written by groundlmm train"
    )
    parser.add_argument(
        "--scenes", type=int, default=100, help="held-out scenes for the caption figures"
    )
    parser.add_argument(
        "--probe-scenes", type=int, default=3000, help="scenes for the feature probe"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine(args.model, refiner="colour")
    figures = {
        "model": args.model,
        "captions": caption_figures(engine, args.scenes),
        "shape_probe": feature_figures(engine.backend, args.probe_scenes),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
