"""The `groundlmm` command: train the demo model, evaluate it, run the ROS demo.

    groundlmm train [--output DIR]          the shipped demo model's one training command
    groundlmm eval --scenes N [--model M]   grounding metrics on held-out scenes; last line JSON
    groundlmm demo [--out DIR]              node + synthetic camera + queries, overlays in DIR
    groundlmm eval-gcg --captions ... --masks ... --images DIR --text-model DIR
                                            GranDf GCG; last line JSON
    groundlmm eval-res --refs ... --instances ... --images DIR --split val
                                            RefCOCO RES; last line JSON

Also reachable as `python -m groundlmm_ros.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from groundlmm_ros.paper_eval import commands as paper_commands


def add_train(sub) -> None:
    from groundlmm_ros.models.presets import demo_model_dir
    from groundlmm_ros.training.recipe import Recipe
    from groundlmm_ros.training.train import Budget

    p = sub.add_parser("train", help="train the demo model from synthetic scenes and captions only")
    p.add_argument(
        "--output",
        default=str(demo_model_dir()),
        help="model directory to write (default: the shipped one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--device", default="cpu", help="torch device (the shipped model was trained on the CPU)"
    )
    for f in fields(Budget) + fields(Recipe):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"(default {f.default})",
        )


def run_train(args) -> None:
    from groundlmm_ros.training.recipe import Recipe
    from groundlmm_ros.training.train import Budget, train

    budget, recipe = (
        kind(**{f.name: getattr(args, f.name) for f in fields(kind)}) for kind in (Budget, Recipe)
    )
    summary = train(
        args.output, budget, recipe, seed=args.seed, threads=args.threads, device=args.device
    )
    print(json.dumps(summary))


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pointing accuracy, mask recall and mIoU on held-out scenes")
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes (default 500)")
    p.add_argument("--model", default="demo", help="preset name or model directory (default: demo)")
    p.add_argument(
        "--refiner",
        default="colour",
        help="auto | sam | colour | threshold (default: colour, the weight-free fallback)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--normalise", choices=("on", "off"), help="override the model's mean-map subtraction"
    )


def run_eval(args) -> None:
    import torch

    from groundlmm_ros.engine.engine import GCG_QUESTION
    from groundlmm_ros.evaluation import evaluate, format_table, held_out_scenes
    from groundlmm_ros.models.presets import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {} if args.normalise is None else {"normalise": args.normalise == "on"}
    engine = build_engine(args.model, device=args.device, refiner=args.refiner, **options)
    scenes = held_out_scenes(args.scenes)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"evaluated {done}/{total} scenes", file=sys.stderr, flush=True)

    metrics = evaluate(engine, scenes, GCG_QUESTION, progress)
    metrics.update(model=args.model, refiner=args.refiner, normalise=engine.normalise)
    print(format_table(metrics))
    print(json.dumps(metrics))


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="start the node on the demo model, publish scenes, ask, save overlays"
    )
    p.add_argument("--out", default="demo_output", help="folder for the overlay images")
    p.add_argument("--scenes", type=int, default=3, help="held-out scenes to show (default 3)")
    p.add_argument("--model", default="demo", help="preset name or model directory (default: demo)")


def run_demo(args) -> None:
    from groundlmm_ros.demo import run

    run(args.out, args.scenes, args.model)


COMMANDS = {
    "train": (add_train, run_train),
    "eval": (add_eval, run_eval),
    "demo": (add_demo, run_demo),
    "eval-gcg": (paper_commands.add_eval_gcg, paper_commands.run_eval_gcg),
    "eval-res": (paper_commands.add_eval_res, paper_commands.run_eval_res),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groundlmm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
