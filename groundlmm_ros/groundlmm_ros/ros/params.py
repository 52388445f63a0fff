"""Every parameter of groundlmm_node, declared in this one place.

Most are read when the node is configured (change them, then cleanup +
configure); the standing-query ones (`DYNAMIC`) also take effect at once when
set on a running node. README's parameter table mirrors PARAMETERS.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from rcl_interfaces.msg import ParameterDescriptor

from groundlmm_ros.engine.types import MODES

RELIABILITIES = ("best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")

# name: (default, description). The default's type is the parameter's type.
PARAMETERS: dict[str, tuple[object, str]] = {
    # The model (read at configure).
    "model": ("demo", "model preset name or model directory"),
    "device": ("cpu", "torch device: cpu, cuda, cuda:1, ..."),
    "dtype": ("auto", "auto (float16 on CUDA, float32 on the CPU), float32, float16 or bfloat16"),
    "conversation": ("", "prompt template: llava_v1 (the paper's GCG) or vicuna_v1; empty: the model's own"),
    "refiner": ("auto", "point-to-mask refiner: auto, sam, colour or threshold (the weight-free fallbacks)"),
    "sam_checkpoint": ("", "SAM checkpoint path (refiner sam/auto)"),
    "seed": (0, "random seed of the model build and sampling"),
    "engine_options": ("{}", "JSON object of extra keyword arguments for build_engine"),
    "autostart": (True, "configure and activate on start-up (for labs that do not drive lifecycles)"),
    # Inputs (read at configure).
    "image_transport": ("raw", "raw: sensor_msgs/Image on `image`; compressed: CompressedImage on `image/compressed`"),
    "image_qos_reliability": ("best_effort", "image, depth and camera_info subscriptions: best_effort or reliable"),
    "image_qos_depth": (5, "history depth of the image, depth and camera_info subscriptions"),
    "query_mode": ("describe", "mode of queries on the `query` topic: describe or refer"),
    "query_qos_depth": (1000, "history depth of the `query` subscription (reliable; deep so bursts are not overwritten)"),
    "query_queue_size": (10, "queries waiting for the model; one more is rejected with a reason"),
    "use_depth": (False, "subscribe to `depth` + `camera_info` and fill the phrases' 3D centroids"),
    "depth_unit_divisor": (1000.0, "16UC1 depth value / divisor = metres (1000: millimetres)"),
    "depth_stamp_tolerance_s": (0.05, "largest |depth stamp - image stamp| of a matching depth frame"),
    # Limits (read at configure).
    "max_image_pixels": (3840 * 2160, "larger images are rejected"),
    "max_query_length": (500, "longer queries (characters) are rejected"),
    "max_new_tokens": (64, "most answer tokens generated per query"),
    # Standing query (dynamic).
    "standing_query": ("", "when set, re-ground it on each new frame, at most max_rate_hz"),
    "standing_mode": ("describe", "mode of the standing query: describe or refer"),
    "max_rate_hz": (1.0, "most standing-query results per second (0: as fast as the model allows)"),
    # Outputs (read at configure).
    "marker_lifetime_s": (1.0, "lifetime of the RViz markers"),
    "status_period_s": (1.0, "period of the /diagnostics status"),
}
DYNAMIC = ("standing_query", "standing_mode", "max_rate_hz")


@dataclass(frozen=True)
class NodeParams:
    model: str
    device: str
    dtype: str
    conversation: str
    refiner: str
    sam_checkpoint: str
    seed: int
    engine_options: str
    autostart: bool
    image_transport: str
    image_qos_reliability: str
    image_qos_depth: int
    query_mode: str
    query_qos_depth: int
    query_queue_size: int
    use_depth: bool
    depth_unit_divisor: float
    depth_stamp_tolerance_s: float
    max_image_pixels: int
    max_query_length: int
    max_new_tokens: int
    standing_query: str
    standing_mode: str
    max_rate_hz: float
    marker_lifetime_s: float
    status_period_s: float

    def engine_kwargs(self) -> dict:
        """The keyword arguments of build_engine (checked by check_parameters)."""
        return json.loads(self.engine_options)


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
    """Why these parameter values are unusable ('' if they are fine); checks only the names present."""
    choices = {
        "image_transport": IMAGE_TRANSPORTS,
        "image_qos_reliability": RELIABILITIES,
        "query_mode": MODES,
        "standing_mode": MODES,
    }
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            return f"parameter {name}={values[name]!r}: expected one of {', '.join(allowed)}"
    positive = ("image_qos_depth", "query_qos_depth", "query_queue_size", "depth_unit_divisor",
                "max_image_pixels", "max_query_length", "max_new_tokens", "marker_lifetime_s", "status_period_s")
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
    return ""
