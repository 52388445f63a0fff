"""The `groundlmm` command: train the demo model, evaluate it, run the ROS demo.

    groundlmm train [--output DIR]          the shipped demo model's one training command
    groundlmm eval --scenes N [--model M]   grounding metrics on held-out scenes; last line JSON
    groundlmm demo [--out DIR]              node + synthetic camera + queries, overlays in DIR
    groundlmm eval-gcg --captions ... --masks ... --images DIR --text-model DIR    GranDf GCG; last line JSON
    groundlmm eval-res --refs ... --instances ... --images DIR --split val        RefCOCO RES; last line JSON

Also reachable as `python -m groundlmm_ros.cli ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def add_train(sub) -> None:
    from .training.recipe import Recipe, demo_model_dir
    from .training.train import Budget

    p = sub.add_parser("train", help="train the demo model from synthetic scenes and captions only")
    p.add_argument("--output", default=str(demo_model_dir()), help="model directory to write (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (the shipped model was trained on the CPU)")
    for f in fields(Budget) + fields(Recipe):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"(default {f.default})")


def run_train(args) -> None:
    from .training.recipe import Recipe
    from .training.train import Budget, train

    budget, recipe = (kind(**{f.name: getattr(args, f.name) for f in fields(kind)}) for kind in (Budget, Recipe))
    summary = train(args.output, budget, recipe, seed=args.seed, threads=args.threads, device=args.device)
    print(json.dumps(summary))


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pointing accuracy, mask recall and mIoU on held-out scenes")
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes (default 500)")
    p.add_argument("--model", default="demo", help="preset name or model directory (default: demo)")
    p.add_argument("--refiner", default="colour",
                   help="auto | sam | colour | threshold (default: colour, the weight-free fallback)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--normalise", choices=("on", "off"), help="override the model's mean-map subtraction")


def run_eval(args) -> None:
    import torch

    from .evaluation import format_table, held_out_scenes, evaluate
    from .models.presets import build_engine
    from .training.recipe import DESCRIBE_QUESTION

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {} if args.normalise is None else {"normalise": args.normalise == "on"}
    engine = build_engine(args.model, device=args.device, refiner=args.refiner, **options)
    scenes = held_out_scenes(args.scenes)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"evaluated {done}/{total} scenes", file=sys.stderr, flush=True)

    metrics = evaluate(engine, scenes, DESCRIBE_QUESTION, progress)
    metrics.update(model=args.model, refiner=args.refiner, normalise=engine.normalise)
    print(format_table(metrics))
    print(json.dumps(metrics))


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start the node on the demo model, publish scenes, ask, save overlays")
    p.add_argument("--out", default="demo_output", help="folder for the overlay images")
    p.add_argument("--scenes", type=int, default=3, help="held-out scenes to show (default 3)")
    p.add_argument("--model", default="demo", help="preset name or model directory (default: demo)")


def run_demo(args) -> None:
    from .demo import run

    run(args.out, args.scenes, args.model)


def add_paper_engine_args(p) -> None:
    """The model options both paper evaluations share."""
    p.add_argument("--model", default="difflmm-7b", help="preset name or model directory (default: difflmm-7b)")
    p.add_argument("--sam-checkpoint", default="", help="SAM checkpoint (the paper: sam_vit_h_4b8939.pth)")
    p.add_argument("--refiner", default="auto", help="auto | sam | colour | threshold (default: auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="torch dtype of the model (float32, float16, bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default: the paper's 512)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images / sentences (0: all)")


def paper_engine(args):
    import torch

    from groundlmm_ros.models.presets import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_new_tokens < 1 or args.limit < 0:
        raise SystemExit("--max-new-tokens must be >= 1 and --limit >= 0")
    return build_engine(args.model, device=args.device, dtype=args.dtype, refiner=args.refiner,
                        sam_checkpoint=args.sam_checkpoint, max_new_tokens=args.max_new_tokens)


def progress_printer(what: str):
    def progress(done, total, name, value):
        print(f"{what} {done}/{total} {name}: {value}", file=sys.stderr, flush=True)

    return progress


def add_eval_gcg(sub) -> None:
    from groundlmm_ros.engine.engine import GCG_QUESTION

    p = sub.add_parser("eval-gcg", help="grounded conversation generation on GranDf: mask recall, mIoU, AP50")
    p.add_argument("--captions", required=True, help="GT caption JSON, e.g. val_gcg_coco_caption_gt.json")
    p.add_argument("--masks", required=True, help="GT mask JSON, e.g. val_gcg_coco_mask_gt.json")
    p.add_argument("--images", default="", help="image folder (GranDf_HA_images/val_test); not read with --rescore")
    p.add_argument("--text-model", required=True, help="local text encoder directory for phrase similarity "
                                                       "(GLaMM: bert-base-uncased)")
    p.add_argument("--predictions", default="", help="folder for {image_id}.json predictions (GLaMM's format)")
    p.add_argument("--rescore", action="store_true", help="score the predictions already in --predictions, no model")
    p.add_argument("--question", default=GCG_QUESTION, help=f"(default {GCG_QUESTION!r})")
    add_paper_engine_args(p)


def data_errors_exit(run):
    """Bad data files end the command with their message (exit status 1), not a traceback."""
    def checked(args) -> None:
        try:
            run(args)
        except ValueError as error:
            raise SystemExit(f"groundlmm {args.command}: {error}") from None

    return checked


@data_errors_exit
def run_eval_gcg(args) -> None:
    from groundlmm_ros.paper_eval import gcg

    if args.rescore and not args.predictions:
        raise SystemExit("--rescore needs --predictions (the folder to read)")
    images, coco = gcg.load_ground_truth(args.captions, args.masks)
    images = images[:args.limit] if args.limit else images
    similarity = gcg.PhraseSimilarity(args.text_model, args.device)  # a bad path fails before the model runs
    if args.rescore:
        predictions = {image.id: gcg.read_prediction(args.predictions, image.id) for image in images}
    else:
        if not args.images:
            raise SystemExit("--images is needed unless --rescore")
        predictions = gcg.run(paper_engine(args), images, args.images, question=args.question,
                              max_new_tokens=args.max_new_tokens, prediction_folder=args.predictions or None,
                              progress=progress_printer("gcg: image"))
    metrics = gcg.score(coco, images, predictions, similarity)
    metrics.update(task="gcg", model=None if args.rescore else args.model)
    print(json.dumps(metrics))


def add_eval_res(sub) -> None:
    from groundlmm_ros.paper_eval.res import MODES, RES_TEMPLATE, RES_TOKENS

    p = sub.add_parser("eval-res", help="referring expression segmentation on RefCOCO/+/g: cIoU, gIoU")
    p.add_argument("--refs", required=True, help="refs pickle, e.g. refcoco/refs(unc).p")
    p.add_argument("--instances", required=True, help="instances.json of the same dataset")
    p.add_argument("--images", required=True, help="COCO train2014 image folder")
    p.add_argument("--split", default="val", help="val | testA | testB (RefCOCO/+), val | test (RefCOCOg)")
    p.add_argument("--mode", choices=MODES, default="recipe",
                   help="recipe: the reference's RES recipe (default); refer: the engine's refer mode")
    p.add_argument("--template", default=RES_TEMPLATE, help=f"recipe question (default {RES_TEMPLATE!r})")
    p.add_argument("--tokens", type=int, default=RES_TOKENS, help=f"recipe: generated tokens merged (default {RES_TOKENS})")
    p.add_argument("--predictions", default="", help="JSON file for the per-sentence predictions")
    add_paper_engine_args(p)


@data_errors_exit
def run_eval_res(args) -> None:
    from groundlmm_ros.paper_eval import res

    if "{}" not in args.template or args.tokens < 1:
        raise SystemExit("--template must contain {} (the expression) and --tokens must be >= 1")
    samples = res.load_samples(args.refs, args.instances, args.split)
    samples = samples[:args.limit] if args.limit else samples
    metrics = res.run(paper_engine(args), samples, args.images, args.mode, template=args.template,
                      token_count=args.tokens, max_new_tokens=args.max_new_tokens,
                      prediction_path=args.predictions or None, progress=progress_printer("res: sentence"))
    metrics.update(task="res", mode=args.mode, split=args.split, model=args.model)
    print(json.dumps(metrics))


COMMANDS = {"train": (add_train, run_train), "eval": (add_eval, run_eval), "demo": (add_demo, run_demo),
            "eval-gcg": (add_eval_gcg, run_eval_gcg), "eval-res": (add_eval_res, run_eval_res)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groundlmm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
