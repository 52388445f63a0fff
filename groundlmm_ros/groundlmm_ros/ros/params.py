"""Every parameter of groundlmm_node, declared in this one place.

Most are read when the node is configured (change them, then cleanup +
configure); the standing-query ones (`DYNAMIC`) also take effect at once when
set on a running node.
"""

from __future__ import annotations

import json
from dataclasses import make_dataclass

from rcl_interfaces.msg import ParameterDescriptor

from groundlmm_ros.engine.types import MODES
from groundlmm_ros.ros.messages import MASK_FORMATS

RELIABILITIES = ("best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")

# name: (default, description). The one home of every parameter: the default's type is the
# parameter's type, NodeParams is built from it, config/params.yaml must hold these defaults
# and README's table is this table (markdown_table(); test/test_node_launch.py checks both).
PARAMETERS: dict[str, tuple[object, str]] = {
    # The model (read at configure).
    "model": (
        "demo",
        "preset (`demo`: the shipped miniature DiffLMM; `tiny-random`, `tiny-difflmm-random`, "
        "`llava-1.5-7b`, `difflmm-7b`) or a model directory",
    ),
    "device": ("cpu", "torch device: `cpu`, `cuda`, `cuda:1`, ..."),
    "dtype": (
        "auto",
        "`auto` (`float16` on CUDA, as the paper runs its models; `float32` on the CPU), "
        "`float32`, `float16` or `bfloat16`",
    ),
    "decoding": (
        "auto",
        "`auto` (`graphs` on CUDA, `dynamic` elsewhere), `dynamic`, `static` (fixed-shape "
        "cache) or `graphs` (static, the per-token step replayed as a CUDA graph)",
    ),
    "conversation": (
        "",
        "prompt template: `llava_v1` (the paper's GCG prompt) or `vicuna_v1` (what the 7B models "
        "were trained with); empty: the model's own",
    ),
    "refiner": (
        "auto",
        "point-to-mask refiner: `auto` (SAM when `sam_checkpoint` is set or the preset ships one, "
        "else `colour`), `sam`, or a weight-free fallback: `colour` or `threshold` (the heat map's "
        "own region)",
    ),
    "sam_checkpoint": ("", "SAM checkpoint file (`sam_vit_h_4b8939.pth` in the paper)"),
    "seed": (0, "seed of the model build and of the diffusion noise"),
    "engine_options": (
        "{}",
        'JSON object of extra Engine options, e.g. `{"min_score": 0.85, "nms_iou": 0.75}`',
    ),
    "autostart": (
        True,
        "configure and activate at start-up (for labs that do not drive lifecycles)",
    ),
    # Inputs (read at configure).
    "image_transport": (
        "raw",
        "`raw`: sensor_msgs/Image on `image`; `compressed`: CompressedImage on `image/compressed`",
    ),
    "image_qos_reliability": (
        "best_effort",
        "reliability of the image, depth and camera_info subscriptions: "
        "`best_effort` (receives from both kinds of publisher) or `reliable`",
    ),
    "image_qos_depth": (5, "history depth of the image, depth and camera_info subscriptions"),
    "query_mode": ("describe", "mode of queries on the `query` topic: `describe` or `refer`"),
    "query_qos_depth": (
        1000,
        "history depth of the `query` subscription (reliable): deep, so a burst of queries "
        "waits in DDS instead of being overwritten",
    ),
    "query_queue_size": (10, "queries waiting for the model; beyond it they are rejected"),
    "use_depth": (False, "subscribe to `depth` + `camera_info` and fill the phrases' 3D centroids"),
    "depth_unit_divisor": (1000.0, "16UC1 depth value / divisor = metres (1000: millimetres)"),
    "depth_stamp_tolerance_s": (
        0.05,
        "largest stamp gap between a colour frame and its depth frame",
    ),
    # Limits (read at configure).
    "max_image_pixels": (3840 * 2160, "larger images are rejected"),
    "max_query_length": (500, "longer queries (characters) are rejected"),
    "max_new_tokens": (64, "most answer tokens generated per query (the paper: 512)"),
    # Standing query (dynamic).
    "standing_query": (
        "",
        "when set, grounded on each new frame, at most `max_rate_hz` (settable at run time)",
    ),
    "standing_mode": ("describe", "mode of the standing query: `describe` or `refer`"),
    "max_rate_hz": (1.0, "most standing-query results per second (0: as fast as the model allows)"),
    # Outputs (read at configure).
    "mask_format": (
        "full",
        "masks in GroundedPhrase: `full` (the image's size) or `cropped` (only the bbox, "
        "which gives the offset: far fewer bytes on a robot's network)",
    ),
    "marker_lifetime_s": (1.0, "lifetime of the RViz markers"),
    "status_period_s": (1.0, "period of the `/diagnostics` status"),
}
DYNAMIC = ("standing_query", "standing_mode", "max_rate_hz")
# build_engine options that are node parameters: one knob each, never set through engine_options.
OWN_PARAMETER = {
    "max_new_tokens": "max_new_tokens",
    "max_query_chars": "max_query_length",
    "conversation": "conversation",
    "dtype": "dtype",
    "device": "device",
    "refiner": "refiner",
    "sam_checkpoint": "sam_checkpoint",
    "seed": "seed",
}


def _engine_kwargs(params) -> dict:
    """The extra keyword arguments of build_engine (checked by check_parameters)."""
    return json.loads(params.engine_options)


# One field per parameter, typed by its default.
NodeParams = make_dataclass(
    "NodeParams",
    [(name, type(default)) for name, (default, _) in PARAMETERS.items()],
    frozen=True,
    namespace={"engine_kwargs": _engine_kwargs},
)


def markdown_table() -> str:
    """README's parameter table: one row per parameter, in PARAMETERS order."""

    def shown(value):
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        return (
            f"`{value}`"
            if isinstance(value, str) and value
            else ('`""`' if value == "" else str(value))
        )

    rows = [
        f"| `{name}` | {shown(default)} | {description} |"
        for name, (default, description) in PARAMETERS.items()
    ]
    return "\n".join(["| Parameter | Default | Meaning |", "|---|---|---|", *rows])


def declare_parameters(node) -> None:
    for name, (default, description) in PARAMETERS.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=description))


def read_parameters(node) -> NodeParams:
    """The node's current parameters; ValueError naming the first bad one."""
    params = NodeParams(**{name: node.get_parameter(name).value for name in PARAMETERS})
    problem = check_parameters(params.__dict__)
    if problem:
        raise ValueError(problem)
    return params


def check_parameters(values: dict) -> str:
    """Why these parameter values are unusable ('' if they are fine); checks only the names
    present."""
    choices = {
        "image_transport": IMAGE_TRANSPORTS,
        "image_qos_reliability": RELIABILITIES,
        "query_mode": MODES,
        "standing_mode": MODES,
        "mask_format": MASK_FORMATS,
    }
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            return f"parameter {name}={values[name]!r}: expected one of {', '.join(allowed)}"
    positive = (
        "image_qos_depth",
        "query_qos_depth",
        "query_queue_size",
        "depth_unit_divisor",
        "max_image_pixels",
        "max_query_length",
        "max_new_tokens",
        "marker_lifetime_s",
        "status_period_s",
    )
    for name in positive:
        if name in values and not values[name] > 0:
            return f"parameter {name}={values[name]!r}: must be > 0"
    for name in ("depth_stamp_tolerance_s", "max_rate_hz"):
        if name in values and not values[name] >= 0:
            return f"parameter {name}={values[name]!r}: must be >= 0"
    if "engine_options" in values:
        try:
            options = json.loads(values["engine_options"])
        except json.JSONDecodeError as error:
            return f"parameter engine_options is not JSON: {error}"
        if not isinstance(options, dict):
            return f"parameter engine_options={values['engine_options']!r}: must be a JSON object"
        own = sorted(set(options) & set(OWN_PARAMETER))
        if own:
            return (
                f"parameter engine_options sets {', '.join(own)}: use the node parameter "
                f"{', '.join(OWN_PARAMETER[k] for k in own)} instead"
            )
    return ""


if __name__ == "__main__":
    print(markdown_table())
