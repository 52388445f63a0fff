"""`groundlmm eval-gcg` and `groundlmm eval-res` (registered in cli.py): the paper's benchmark
evaluations; progress on stderr, the metrics JSON as the last (only) stdout line."""

from __future__ import annotations

import json
import sys

from groundlmm_ros.engine.types import PAPER_ANSWER_TOKENS


def add_paper_engine_args(p) -> None:
    """The model options both paper evaluations share."""
    p.add_argument(
        "--model", default="difflmm-7b", help="preset name or model directory (default: difflmm-7b)"
    )
    p.add_argument(
        "--sam-checkpoint", default="", help="SAM checkpoint (the paper: sam_vit_h_4b8939.pth)"
    )
    p.add_argument(
        "--refiner", default="auto", help="auto | sam | colour | threshold (default: auto)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (float16 on CUDA, as the paper; float32 on the CPU), "
        "float32, float16 or bfloat16",
    )
    p.add_argument(
        "--conversation",
        default="",
        help="prompt template (default: the model's own; the paper's models use llava_v1)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=PAPER_ANSWER_TOKENS,
        help=f"answer length limit (default: the paper's {PAPER_ANSWER_TOKENS})",
    )
    p.add_argument(
        "--limit", type=int, default=0, help="evaluate only the first N images / sentences (0: all)"
    )


def paper_engine(args):
    import torch

    from groundlmm_ros.models.presets import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    return build_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        conversation=args.conversation,
        refiner=args.refiner,
        sam_checkpoint=args.sam_checkpoint,
        max_new_tokens=args.max_new_tokens,
    )


def progress_printer(what: str):
    def progress(done, total, name, result):
        print(f"{what} {done}/{total} {name}: {result}", file=sys.stderr, flush=True)

    return progress


def add_eval_gcg(sub) -> None:
    from groundlmm_ros.engine.engine import GCG_QUESTION

    p = sub.add_parser(
        "eval-gcg", help="grounded conversation generation on GranDf: mask recall, mIoU, AP50"
    )
    p.add_argument(
        "--captions", required=True, help="GT caption JSON, e.g. val_gcg_coco_caption_gt.json"
    )
    p.add_argument("--masks", required=True, help="GT mask JSON, e.g. val_gcg_coco_mask_gt.json")
    p.add_argument(
        "--images",
        default="",
        help="image folder (GranDf_HA_images/val_test); not read with --rescore",
    )
    p.add_argument(
        "--text-model",
        required=True,
        help="local text encoder directory for phrase similarity (GLaMM: bert-base-uncased)",
    )
    p.add_argument(
        "--predictions", default="", help="folder for {image_id}.json predictions (GLaMM's format)"
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score the predictions already in --predictions, no model",
    )
    p.add_argument("--question", default=GCG_QUESTION, help=f"(default {GCG_QUESTION!r})")
    add_paper_engine_args(p)


def paper_command(run):
    """Bad flags or data files end the command with their message (exit status 1), not a
    traceback."""

    def checked(args) -> None:
        if args.max_new_tokens < 1 or args.limit < 0:
            raise SystemExit("--max-new-tokens must be >= 1 and --limit >= 0")
        try:
            run(args)
        except ValueError as error:
            raise SystemExit(f"groundlmm {args.command}: {error}") from None

    return checked


@paper_command
def run_eval_gcg(args) -> None:
    from groundlmm_ros.paper_eval import gcg
    from groundlmm_ros.paper_eval.masks import check_images

    if args.rescore and not args.predictions:
        raise SystemExit("--rescore needs --predictions (the folder to read)")
    images, coco = gcg.load_ground_truth(args.captions, args.masks)
    images = images[: args.limit] if args.limit else images
    # Built first, so a bad path fails before the model runs.
    similarity = gcg.PhraseSimilarity(args.text_model, args.device)
    if args.rescore:
        predictions = {
            image.id: gcg.read_prediction(args.predictions, image.id) for image in images
        }
    else:
        if not args.images:
            raise SystemExit("--images is needed unless --rescore")
        check_images(args.images, [image.file_name for image in images])
        predictions = gcg.run(
            paper_engine(args),
            images,
            args.images,
            question=args.question,
            max_new_tokens=args.max_new_tokens,
            prediction_folder=args.predictions or None,
            progress=progress_printer("gcg: image"),
        )
    metrics = gcg.score(coco, images, predictions, similarity)
    metrics.update(task="gcg", model=None if args.rescore else args.model)
    print(json.dumps(metrics))


def add_eval_res(sub) -> None:
    from groundlmm_ros.paper_eval.res import MODES, RES_TEMPLATE, RES_TOKENS

    p = sub.add_parser(
        "eval-res", help="referring expression segmentation on RefCOCO/+/g: cIoU, gIoU"
    )
    p.add_argument("--refs", required=True, help="refs pickle, e.g. refcoco/refs(unc).p")
    p.add_argument("--instances", required=True, help="instances.json of the same dataset")
    p.add_argument("--images", required=True, help="COCO train2014 image folder")
    p.add_argument(
        "--split", default="val", help="val | testA | testB (RefCOCO/+), val | test (RefCOCOg)"
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="recipe",
        help="recipe: the reference's RES recipe (default); refer: the engine's refer mode",
    )
    p.add_argument(
        "--template", default=RES_TEMPLATE, help=f"recipe question (default {RES_TEMPLATE!r})"
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=RES_TOKENS,
        help=f"recipe: generated tokens merged (default {RES_TOKENS})",
    )
    p.add_argument(
        "--predictions", default="", help="JSON Lines file for the per-sentence predictions"
    )
    add_paper_engine_args(p)


@paper_command
def run_eval_res(args) -> None:
    from groundlmm_ros.paper_eval import res
    from groundlmm_ros.paper_eval.masks import check_images

    if "{}" not in args.template or args.tokens < 1:
        raise SystemExit("--template must contain {} (the expression) and --tokens must be >= 1")
    samples = res.load_samples(args.refs, args.instances, args.split)
    samples = samples[: args.limit] if args.limit else samples
    check_images(args.images, [sample.file_name for sample in samples])
    metrics = res.run(
        paper_engine(args),
        samples,
        args.images,
        args.mode,
        template=args.template,
        token_count=args.tokens,
        max_new_tokens=args.max_new_tokens,
        prediction_path=args.predictions or None,
        progress=progress_printer("res: sentence"),
    )
    metrics.update(task="res", mode=args.mode, split=args.split, model=args.model)
    print(json.dumps(metrics))
