"""Every parameter of groundlmm_node, declared in this one place.

Most are read when the node is configured (change them, then cleanup +
configure); the standing-query ones (`DYNAMIC`) also take effect at once when
set on a running node. Each named camera has its own standing query:
`<camera>.standing_query`, `<camera>.standing_mode`, `<camera>.max_rate_hz`,
declared at start-up and at configure (for cameras named since) with the plain
parameters' values as defaults, and kept across cleanup, so a value set at run
time survives a reconfigure (the camera named "" uses the plain ones). A float
parameter also takes a whole number.
"""

from __future__ import annotations

import json
import re
from dataclasses import make_dataclass

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.parameter import Parameter

from groundlmm_ros.engine.types import MAX_NEW_TOKENS, MODES
from groundlmm_ros.ros.messages import MASK_FORMATS

# models/presets.py's PRESETS by name, written here by scripts/generate_docs.py (this module
# must not import torch); test_docs.py fails while it is stale.
PRESET_NAMES = (
    "demo",
    "tiny-random",
    "llava-1.5-7b",
    "tiny-difflmm-random",
    "difflmm-7b",
    "tiny-qwen2.5-vl-random",
    "qwen2.5-vl-3b",
    "qwen2.5-vl-7b",
    "tiny-llava-next-random",
    "llava-next-mistral-7b",
    "llava-next-vicuna-7b",
    "tiny-internvl-random",
    "internvl3-2b",
    "internvl3-8b",
)
# models/presets.py's TRACKERS by name, written here by scripts/generate_docs.py as PRESET_NAMES.
TRACKER_NAMES = (
    "sam2.1-tiny",
    "sam2.1-small",
    "sam2.1-base-plus",
    "sam2.1-large",
    "tiny-random",
)
# How a standing query's objects are followed between groundings: `off`, ground every frame.
TRACKINGS = ("off", "colour", "sam2")
RELIABILITIES = ("best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")

# name: (default, description). The one home of every parameter: the default's type is the
# parameter's type, NodeParams is built from it, and config/params.yaml and docs/node.md's table
# are generated from it (scripts/generate_docs.py; test_docs.py fails while they are stale).
PARAMETERS: dict[str, tuple[object, str]] = {
    # The model (read at configure).
    "model": (
        "demo",
        "preset (" + ", ".join(f"`{name}`" for name in PRESET_NAMES) + "; docs/models.md) "
        "or a model directory",
    ),
    "device": ("cpu", "torch device: `cpu`, `cuda`, `cuda:1`, ..."),
    "dtype": (
        "auto",
        "`auto` (`float16` on CUDA, as the paper runs its models; `float32` on the CPU), "
        "`float32`, `float16` or `bfloat16`",
    ),
    "compile": (
        "auto",
        "the decoder's per-token step under torch.compile: `auto` (on for CUDA), `on` or `off`",
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
        "configure and activate at start-up (for labs that do not drive lifecycles); a configure "
        "that fails then ends the process with exit code 1",
    ),
    # Inputs (read at configure).
    "cameras": (
        [""],
        "the cameras one model serves: each name's topics are `<name>/image`, `<name>/query`, "
        "`<name>/grounding`, ... and its standing query `<name>.standing_query`; the name "
        '`""` is the camera on the plain names (`image`, `query`, `grounding`, ...)',
    ),
    "image_transport": (
        "raw",
        "`raw`: sensor_msgs/Image on `image`; `compressed`: CompressedImage on `image/compressed`",
    ),
    "image_qos_reliability": (
        "reliable",
        "reliability of the image, depth and camera_info subscriptions: `reliable` (every frame "
        "of a reliable publisher, as camera drivers publish by default, some ms later; nothing "
        "from a best-effort one) or `best_effort` (both kinds, but most camera-sized frames of a "
        "publisher on Fast DDS's default profile are lost: bench/transport.py)",
    ),
    "image_qos_depth": (5, "history depth of the image, depth and camera_info subscriptions"),
    "query_mode": ("describe", "mode of queries on the `query` topic: `describe` or `refer`"),
    "query_qos_depth": (
        1000,
        "history depth of the `query` subscription (reliable): deep, so a burst of queries "
        "waits in DDS instead of being overwritten",
    ),
    "query_queue_size": (
        10,
        "queries waiting for the model, per camera; beyond it they are rejected",
    ),
    "use_depth": (False, "subscribe to `depth` + `camera_info` and fill the phrases' 3D centroids"),
    "depth_unit_divisor": (1000.0, "16UC1 depth value / divisor = metres (1000: millimetres)"),
    "depth_stamp_tolerance_s": (
        0.05,
        "largest stamp gap between a colour frame and its depth frame",
    ),
    # Limits (read at configure).
    "max_image_pixels": (3840 * 2160, "larger images are rejected"),
    "max_query_length": (500, "longer queries (characters) are rejected"),
    "max_new_tokens": (
        MAX_NEW_TOKENS,
        "most answer tokens generated per query; replaces the model's own length (the paper: 512)",
    ),
    # Standing query (dynamic).
    "standing_query": (
        "",
        "when set, grounded on each new frame, at most `max_rate_hz` (settable at run time); "
        "with `tracking` on, grounded once and then tracked",
    ),
    "standing_mode": ("describe", "mode of the standing query: `describe` or `refer`"),
    "max_rate_hz": (1.0, "most standing-query results per second (0: as fast as the model allows)"),
    # Ground, then track (read at configure).
    "tracking": (
        "off",
        "standing queries: `off` (ground each frame, at most `max_rate_hz`), or ground once and "
        "track the grounded objects on every later frame with `sam2` (SAM 2's video model, "
        "`tracker_model`) or `colour` (weight-free, for flat-coloured objects: the CPU demo)",
    ),
    "tracker_model": (
        "sam2.1-tiny",
        "with `tracking: sam2`: a preset ("
        + ", ".join(f"`{name}`" for name in TRACKER_NAMES)
        + "; docs/models.md) or a local Hugging Face SAM 2 video directory",
    ),
    "tracking_rate_hz": (
        30.0,
        "most tracked results per second per camera (0: one per frame, as fast as tracking goes)",
    ),
    "reground_period_s": (
        2.0,
        "a tracked standing query is grounded again this long (frame stamps) after its last "
        "grounding started",
    ),
    "track_min_score": (
        0.5,
        "a tracked object scoring below this (or lost) asks for a grounding at once",
    ),
    # Outputs (read at configure).
    "mask_format": (
        "full",
        "masks in GroundedPhrase: `full` (mono8, the image's size), `cropped` (mono8, only the "
        "bbox, which gives the offset: far fewer bytes on a robot's network) or `png` (the full "
        "mask as a PNG file: the fewest bytes; use it with `ros2 action send_goal`, which "
        "prints every byte on a line of its own)",
    ),
    "marker_lifetime_s": (1.0, "lifetime of the RViz markers"),
    "status_period_s": (1.0, "period of the `/diagnostics` status"),
    "action_result_timeout_s": (
        300,
        "how long the `~/ground` action keeps a finished goal's result (masks included) for a "
        "client that asks for it late; after it, such a client gets status UNKNOWN and no result",
    ),
}
DYNAMIC = ("standing_query", "standing_mode", "max_rate_hz")
# A camera's name is a ROS name token: it prefixes topics and parameters.
CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# build_engine options that are node parameters: one knob each, never set through engine_options.
OWN_PARAMETER = {
    "max_new_tokens": "max_new_tokens",
    "max_query_length": "max_query_length",
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


def camera_parameter(camera: str, name: str) -> str:
    """The parameter `name` (one of DYNAMIC) of one camera: `head.standing_query`; the camera
    named "" has the plain one."""
    return f"{camera}.{name}" if camera else name


def parameter_camera(parameter: str) -> tuple[str, str]:
    """camera_parameter's inverse for the DYNAMIC names: (camera, name); other names
    ("", themselves)."""
    camera, _, name = parameter.rpartition(".")
    return (camera, name) if name in DYNAMIC else ("", parameter)


def declare_camera_parameters(node, cameras: list[str]) -> None:
    """Declare the named cameras' standing-query parameters not yet declared, defaulting to the
    plain ones' values now (a value given at launch wins)."""
    for camera in cameras:
        for name in DYNAMIC if camera else ():
            parameter = camera_parameter(camera, name)
            if not node.has_parameter(parameter):
                description = f"{PARAMETERS[name][1]}, of camera {camera!r}"
                node.declare_parameter(
                    parameter,
                    node.get_parameter(name).value,
                    ParameterDescriptor(description=description),
                )


def floats_from_whole_numbers(parameters: list[Parameter]) -> list[Parameter]:
    """rclpy's pre-set parameters callback: a whole number given for a float parameter
    (`ros2 param set /groundlmm_node max_rate_hz 2`) is set as that float, not refused for its
    type."""

    def is_float(name: str) -> bool:
        default = PARAMETERS.get(parameter_camera(name)[1], (None,))[0]
        return isinstance(default, float)

    return [
        Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
        if p.type_ == Parameter.Type.INTEGER and is_float(p.name)
        else p
        for p in parameters
    ]


def markdown_table() -> str:
    """docs/node.md's parameter table: one row per parameter, in PARAMETERS order."""

    def shown(value):
        if isinstance(value, list):
            return "`[" + ", ".join(json.dumps(item) for item in value) + "]`"
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


CHOICES = {
    "image_transport": IMAGE_TRANSPORTS,
    "image_qos_reliability": RELIABILITIES,
    "query_mode": MODES,
    "standing_mode": MODES,
    "mask_format": MASK_FORMATS,
    "tracking": TRACKINGS,
}
POSITIVE = (
    "image_qos_depth",
    "query_qos_depth",
    "query_queue_size",
    "depth_unit_divisor",
    "max_image_pixels",
    "max_query_length",
    "max_new_tokens",
    "marker_lifetime_s",
    "status_period_s",
    "action_result_timeout_s",
    "reground_period_s",
)
NOT_NEGATIVE = ("depth_stamp_tolerance_s", "max_rate_hz", "tracking_rate_hz")


def check_parameters(values: dict) -> str:
    """Why these parameter values are unusable ('' if they are fine); checks only the names
    present (a camera's `head.standing_mode` as `standing_mode`)."""
    for parameter, value in values.items():
        problem = _check_parameter(parameter_camera(parameter)[1], value)
        if problem:
            return f"parameter {parameter}{problem}"
    return ""


def _check_parameter(name: str, value) -> str:
    """What is wrong with one value, after its parameter's name ('' if nothing)."""
    if name in CHOICES and value not in CHOICES[name]:
        return f"={value!r}: expected one of {', '.join(CHOICES[name])}"
    if name in POSITIVE and not value > 0:
        return f"={value!r}: must be > 0"
    if name in NOT_NEGATIVE and not value >= 0:
        return f"={value!r}: must be >= 0"
    if name == "cameras":
        return _cameras_problem(list(value))
    if name == "track_min_score" and not 0 <= value <= 1:
        return f"={value!r}: must be in [0, 1]"
    if name == "engine_options":
        try:
            options = json.loads(value)
        except json.JSONDecodeError as error:
            return f" is not JSON: {error}"
        if not isinstance(options, dict):
            return f"={value!r}: must be a JSON object"
        own = sorted(set(options) & set(OWN_PARAMETER))
        if own:
            return (
                f" sets {', '.join(own)}: use the node parameter "
                f"{', '.join(OWN_PARAMETER[k] for k in own)} instead"
            )
    return ""


def _cameras_problem(cameras: list[str]) -> str:
    if not cameras:
        return '=[]: name at least one camera ("" is the camera on the plain topic names)'
    bad = [name for name in cameras if name and not CAMERA_NAME.fullmatch(name)]
    if bad:
        return (
            f"={cameras!r}: {bad[0]!r} is not a camera name (a letter, then letters, digits "
            'or _; or "" for the plain topic names)'
        )
    if len(set(cameras)) < len(cameras):
        return f"={cameras!r}: a camera is named twice"
    return ""
