"""groundlmm_node: the lifecycle node that grounds queries in camera frames (its process, the
signals and the exit, is ros/process.py).

configure loads the model and opens the query topics and the action,
activate starts the worker and the camera subscriptions, deactivate stops
them (queued queries end in a failed result), cleanup frees the model.
Callbacks never run the model: they fill the worker's newest-frame slot and
bounded queue of their camera. Each accepted (queued) query ends in exactly
one GroundingResult on its camera's `grounding` (success false + the reason
when it failed); a query never accepted, also one sent while the node is
inactive, gets, with the reason, a DiagnosticStatus on `~/rejected`. An
action goal's Ground result carries the same, and the action keeps it for
`action_result_timeout_s` for a client that asks late.

One model serves every camera of the `cameras` parameter: camera "head" reads
`head/image`, `head/depth`, `head/camera_info`, `head/query` and answers on
`head/grounding` (and `~/head/overlay`, ...); the camera named "" (the
default) on the plain names.
"""

from __future__ import annotations

import threading

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.engine.query import query_problem
from groundlmm_ros.ros import depth, diagnostics, messages, qos_warnings
from groundlmm_ros.ros.diagnostics import Stats
from groundlmm_ros.ros.goals import GoalRun
from groundlmm_ros.ros.params import (
    DYNAMIC,
    camera_parameter,
    check_parameters,
    declare_camera_parameters,
    declare_parameters,
    floats_from_whole_numbers,
    parameter_camera,
    read_parameters,
)
from groundlmm_ros.ros.results import ResultPublisher, log_query_problem
from groundlmm_ros.ros.tracking import Tracking
from groundlmm_ros.ros.worker import Job, Worker, release_cached_memory

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
# goal, result and cancel requests kept until taken
ACTION_SERVICE_DEPTH = 1000
# Each camera's outputs: (message type, name under the camera, node-private, history depth).
CAMERA_OUTPUTS = {
    "grounding": (GroundingResult, "grounding", False, 10),
    "overlay": (Image, "overlay", True, 2),
    "markers": (MarkerArray, "markers", True, 2),
    "points": (PointCloud2, "points", True, 2),
}


def camera_topic(camera: str, name: str, private: bool = False) -> str:
    """A camera's relative topic: `head/image` (`~/head/overlay` when private); the camera named
    "" has the plain `image` (`~/overlay`)."""
    topic = f"{camera}/{name}" if camera else name
    return f"~/{topic}" if private else topic


def standing_text(camera: str, query: str, mode: str, rate: float) -> str:
    """A camera's standing query, as the log says it."""
    text = f"standing query {query!r} ({mode}), " + (
        f"at most {rate} Hz" if rate > 0 else "as fast as the model allows"
    )
    return (f"camera {camera!r}: " if camera else "") + (text if query else "no standing query")


def preset_engine(model: str, **options):
    """The default engine factory: models.presets.build_engine, imported only when called, so
    torch loads at configure, not at start-up."""
    from groundlmm_ros.models.presets import build_engine

    return build_engine(model, **options)


class GroundingNode(LifecycleNode):
    """engine_factory(model, **options) builds the engine at configure, with the arguments of
    models.presets.build_engine (the default, preset_engine)."""

    def __init__(self, engine_factory=preset_engine, **kwargs):
        super().__init__("groundlmm_node", **kwargs)
        declare_parameters(self)
        # the cameras' own standing queries can be set before configure
        cameras = self.get_parameter("cameras").value
        if not check_parameters({"cameras": cameras}):
            declare_camera_parameters(self, cameras)
        self.add_pre_set_parameters_callback(floats_from_whole_numbers)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._engine_factory = engine_factory
        self._group = ReentrantCallbackGroup()
        self._stats = Stats()
        # While configured: the parameters read at configure, the engine, the action server, the
        # node's own outputs, the query subscriptions, per camera its depth frames and results.
        self._params = self._engine = self._action_server = self._status_timer = None
        # with tracking on: makes one camera's (or goal's) TrackSet
        self._new_tracks = None
        self._outputs: dict = {}
        self._queries: list = []
        self._depth: dict[str, depth.DepthBuffer] = {}
        self.results: dict[str, ResultPublisher] = {}
        # While active: the worker and the camera subscriptions.
        self._worker: Worker | None = None
        self._inputs: list = []
        self._rejected_lock = threading.Lock()
        # goal id -> its run, until its execute callback takes it
        self._goal_runs: dict[bytes, GoalRun] = {}
        self._goal_runs_lock = threading.Lock()

    @property
    def state(self) -> str:
        """The lifecycle state's label, as rclpy's state machine holds it: "unconfigured",
        "inactive", "active", or a transition's ("configuring", ...)."""
        return self._state_machine.current_state[1]

    # ---- lifecycle -------------------------------------------------------------------------

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            params = read_parameters(self)
        except ValueError as error:
            self.get_logger().error(f"configure failed: {error}")
            return FAILURE
        self.get_logger().info(
            f"loading model {params.model!r} on {params.device} ({params.dtype})"
        )
        try:
            self._engine = self._build_engine(params)
        # a bad model path or preset must leave the node unconfigured, alive
        except Exception as error:
            self.get_logger().error(
                f"configure failed: cannot build model {params.model!r}: "
                f"{type(error).__name__}: {error}"
            )
            return FAILURE
        try:
            self._new_tracks = self._tracks_factory(params)
        except Exception as error:
            self.get_logger().error(
                f"configure failed: cannot build tracker {params.tracking!r} "
                f"({params.tracker_model!r}): {type(error).__name__}: {error}"
            )
            self._engine = None
            return FAILURE
        self._params = params
        declare_camera_parameters(self, params.cameras)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        # Rejections and the status go out in every state; a camera's outputs only while active.
        self._outputs = {
            "rejected": qos_warnings.publisher(
                self, DiagnosticStatus, "~/rejected", QoSProfile(depth=1000)
            ),
            "status": qos_warnings.publisher(self, DiagnosticArray, "/diagnostics", reliable),
        }
        self._depth = {camera: depth.DepthBuffer() for camera in params.cameras}
        self.results = {camera: self._camera_results(camera, params) for camera in params.cameras}
        # Queries are answered while inactive too: rejected with the reason.
        self._queries = [
            self._subscription(
                String,
                camera_topic(camera, "query"),
                self._on_query(camera),
                QoSProfile(depth=params.query_qos_depth),
            )
            for camera in params.cameras
        ]
        self._action_server = self._ground_action(params)
        self._status_timer = self.create_timer(
            params.status_period_s, self._publish_status, self._group
        )
        self.get_logger().info("configured")
        return SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        # the lifecycle publishers first: the worker may finish a standing query at once
        super().on_activate(state)
        params = self._params
        image = "image/compressed" if params.image_transport == "compressed" else "image"
        self._worker = Worker(
            self._engine,
            cameras={
                camera: (self.resolve_topic_name(camera_topic(camera, image)), self.results[camera])
                for camera in params.cameras
            },
            queue_size=params.query_queue_size,
            max_image_pixels=params.max_image_pixels,
            max_new_tokens=params.max_new_tokens,
            log_error=self._log_worker_error,
            clock=lambda: self.get_clock().now().nanoseconds * 1e-9,
            new_tracks=self._new_tracks,
            tracking_rate_hz=params.tracking_rate_hz,
        )
        # the standing queries as set now
        standing = {camera: self._standing_of(camera) for camera in params.cameras}
        for camera, (query, mode, rate) in standing.items():
            self._worker.set_standing(query, mode, rate, camera=camera)
        self._worker.start()
        self._inputs = [
            subscription
            for camera in params.cameras
            for subscription in self._camera_inputs(camera)
        ]
        self.get_logger().info(
            "active: serving queries; "
            + "; ".join(standing_text(camera, *standing[camera]) for camera in params.cameras)
        )
        return SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        # the worker's last (failed) results go out before the lifecycle publishers stop
        self.stop_serving("the node was deactivated")
        self.get_logger().info("inactive")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model freed")
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.shut_down()
        return SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.shut_down("the node hit an error")
        return SUCCESS

    def shut_down(
        self, reason: str = "the node is shutting down", worker_timeout_s: float = 30.0
    ) -> None:
        """Stop the worker and free the model, whatever the lifecycle state."""
        self.stop_serving(reason, worker_timeout_s)
        self._release()

    def stop_serving(self, reason: str, worker_timeout_s: float = 30.0) -> None:
        """Stop the subscriptions and the worker: its running job is cancelled at its next
        token, its queued ones end with `reason`."""
        for subscription in self._inputs:
            self.destroy_subscription(subscription)
        self._inputs = []
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(reason, worker_timeout_s)

    def _release(self) -> None:
        if self._status_timer is not None:
            self.destroy_timer(self._status_timer)
        if self._action_server is not None:
            self._action_server.destroy()
        for publisher in self._outputs.values():
            self.destroy_publisher(publisher)
        for subscription in self._queries:
            self.destroy_subscription(subscription)
        for results in self.results.values():
            for publisher in results.publishers.values():
                self.destroy_lifecycle_publisher(publisher)
        self._status_timer = self._action_server = self._params = self._engine = None
        self._new_tracks = None
        self._outputs, self._queries, self._depth, self.results = {}, [], {}, {}
        release_cached_memory()

    def _log_worker_error(self, text: str) -> None:
        # after Ctrl-C, publishing fails by design: nothing to report
        if self.context.ok():
            self.get_logger().error(text)

    # ---- what configure makes ----------------------------------------------------------------

    def _build_engine(self, params):
        # The node's limits are the limits: they replace the model's own answer-length setting.
        engine = self._engine_factory(
            params.model,
            device=params.device,
            dtype=params.dtype,
            compile=params.compile,
            conversation=params.conversation,
            refiner=params.refiner,
            sam_checkpoint=params.sam_checkpoint,
            seed=params.seed,
            max_new_tokens=params.max_new_tokens,
            max_query_length=params.max_query_length,
            **params.engine_kwargs(),
        )
        # The decoder's buckets (CUDA graphs, compiled steps) and SAM's encoder for steps of up to
        # one frame per camera now, not on the first query.
        seconds = engine.warm_up(len(params.cameras))
        self.get_logger().info(f"warm-up (compile {params.compile}): {seconds:.1f} s")
        return engine

    def _tracks_factory(self, params):
        """With tracking on, what makes a fresh TrackSet (a SAM 2 model is loaded once here and
        shared by every tracker); None with tracking off."""
        if params.tracking == "off":
            return None
        from groundlmm_ros.engine.trackers import ColourTracker
        from groundlmm_ros.engine.tracking import TrackSet

        new_tracker = ColourTracker
        if params.tracking == "sam2":
            from groundlmm_ros.models.presets import build_sam2_video
            from groundlmm_ros.models.sam2_tracker import Sam2Tracker

            model, processor = build_sam2_video(params.tracker_model, params.device)

            def new_tracker():
                return Sam2Tracker(model, processor)

        def new_tracks():
            return TrackSet(new_tracker(), params.reground_period_s, params.track_min_score)

        self.get_logger().info(f"tracking: {params.tracking}")
        return new_tracks

    def _camera_results(self, camera: str, params) -> ResultPublisher:
        """The camera's CAMERA_OUTPUTS, as lifecycle publishers, behind its ResultPublisher."""
        publishers = {
            output: qos_warnings.publisher(
                self,
                msg_type,
                camera_topic(camera, name, private),
                QoSProfile(depth=history, reliability=ReliabilityPolicy.RELIABLE),
                lifecycle=True,
            )
            for output, (msg_type, name, private, history) in CAMERA_OUTPUTS.items()
        }
        return ResultPublisher(self, camera, publishers, params, self._depth[camera], self._stats)

    def _ground_action(self, params) -> ActionServer:
        # ROS's default service QoS keeps 10 requests: a burst of goals (or of their result
        # requests) would overwrite the ones not yet taken.
        burst = QoSProfile(depth=ACTION_SERVICE_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        return ActionServer(
            self,
            Ground,
            "~/ground",
            execute_callback=self._execute_goal,
            handle_accepted_callback=self._on_goal_accepted,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal: CancelResponse.ACCEPT,
            goal_service_qos_profile=burst,
            result_service_qos_profile=burst,
            cancel_service_qos_profile=burst,
            result_timeout=params.action_result_timeout_s,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )

    # ---- parameters --------------------------------------------------------------------------

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        values = {p.name: p.value for p in parameters}
        problem = check_parameters(values)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        # cameras whose standing query changes
        standing = {camera for camera, name in map(parameter_camera, values) if name in DYNAMIC}
        cameras = values.get("cameras", self.get_parameter("cameras").value)
        if self._params is not None:
            cameras = self._params.cameras
        if "" in standing and cameras and "" not in cameras:
            return SetParametersResult(
                successful=False,
                reason="this node's cameras are "
                + ", ".join(cameras)
                + f": set one camera's standing query, e.g. {cameras[0]}.standing_query "
                '(the plain standing_* parameters are the camera named ""\'s)',
            )
        worker = self._worker
        for camera in standing if worker is not None else ():
            query, mode, rate = self._standing_of(camera, values)
            worker.set_standing(query, mode, rate, camera=camera)
            self.get_logger().info(standing_text(camera, query, mode, rate))
        return SetParametersResult(successful=True)

    def _standing_of(self, camera: str, changing: dict | None = None) -> tuple[str, str, float]:
        """The camera's (standing_query, standing_mode, max_rate_hz): as set, or as `changing`
        (the parameters being set now) makes them."""
        changing = changing or {}
        names = [camera_parameter(camera, name) for name in DYNAMIC]
        return tuple(
            changing[name] if name in changing else self.get_parameter(name).value for name in names
        )

    # ---- inputs ------------------------------------------------------------------------------

    def _subscription(self, msg_type, topic: str, callback, qos: QoSProfile):
        return qos_warnings.subscription(self, msg_type, topic, callback, qos, self._group)

    def _camera_inputs(self, camera: str) -> list:
        """The camera's image subscription, and with use_depth its depth and camera_info ones."""
        params = self._params
        image_qos = QoSProfile(
            depth=params.image_qos_depth,
            history=HistoryPolicy.KEEP_LAST,
            reliability=ReliabilityPolicy.RELIABLE
            if params.image_qos_reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT,
        )
        compressed = params.image_transport == "compressed"
        inputs = [
            self._subscription(
                CompressedImage if compressed else Image,
                camera_topic(camera, "image/compressed" if compressed else "image"),
                self._on_image(camera),
                image_qos,
            )
        ]
        if params.use_depth:
            buffer = self._depth[camera]
            inputs += [
                self._subscription(
                    Image, camera_topic(camera, "depth"), self._on_depth(buffer), image_qos
                ),
                self._subscription(
                    CameraInfo,
                    camera_topic(camera, "camera_info"),
                    self._on_camera_info(buffer),
                    image_qos,
                ),
            ]
        return inputs

    # Each makes one camera's subscription callback.

    def _on_image(self, camera: str):
        def on_image(msg) -> None:
            self._stats.count("frames_received")
            worker = self._worker
            if worker is not None:
                worker.put_frame(msg, camera)

        return on_image

    def _on_depth(self, buffer: depth.DepthBuffer):
        def on_depth(msg: Image) -> None:
            self._stats.count("depth_frames_received")
            buffer.add_depth(msg)

        return on_depth

    def _on_camera_info(self, buffer: depth.DepthBuffer):
        def on_camera_info(msg: CameraInfo) -> None:
            self._stats.count("camera_infos_received")
            buffer.set_info(msg)

        return on_camera_info

    def _on_query(self, camera: str):
        def on_query(msg: String) -> None:
            self._stats.count("queries_received")
            reply = self.results[camera]
            self._submit(Job(msg.data, self._params.query_mode, "topic", reply, camera=camera))

        return on_query

    def _submit(self, job: Job) -> str:
        """Queue a job, or reject it with the reason (returned, '' when queued)."""
        worker = self._worker
        reason = query_problem(job.query, job.mode, self._params.max_query_length)
        if not reason:
            reason = (
                worker.submit(job)
                if worker is not None
                else f"the node is {self.state}, not active"
            )
        if reason:
            self._reject(job, reason)
        return reason

    def _reject(self, job: Job, reason: str) -> None:
        """A query that was never accepted: its answer is a DiagnosticStatus on ~/rejected."""
        self._stats.count("queries_rejected")
        log_query_problem(self, job, "rejected", reason)
        publisher = self._outputs.get("rejected")
        if publisher is not None:
            with self._rejected_lock:
                publisher.publish(
                    messages.rejection(job.query, job.mode, job.source, job.camera, reason)
                )

    # ---- the action --------------------------------------------------------------------------

    def _on_goal_accepted(self, goal_handle) -> None:
        """Queue an accepted goal with the worker (as ros2/examples' server_queue_goals queues goal
        handles): a waiting goal holds no executor thread; one refused now ends aborted at once with
        the reason."""
        goal = goal_handle.request
        self._stats.count("queries_received")
        camera = goal.camera or self._params.cameras[0]
        run = GoalRun(goal_handle, self.context, self.results.get(camera))
        with self._goal_runs_lock:
            self._goal_runs[bytes(goal_handle.goal_id.uuid)] = run
        image = goal.image if goal.image.width and goal.image.height else None
        job = Job(goal.query, goal.mode or "describe", "action", run, camera=camera, image=image)
        if goal.track and self._new_tracks is None:
            run.refused = "the goal asks to track, but tracking is off (parameter tracking)"
            self._reject(job, run.refused)
        else:
            job.tracking = Tracking(self._new_tracks()) if goal.track else None
            run.refused = self._submit(job)
        if run.refused:
            run.started()

    def _execute_goal(self, goal_handle) -> Ground.Result:
        with self._goal_runs_lock:
            run = self._goal_runs.pop(bytes(goal_handle.goal_id.uuid))
        return run.execute()

    # ---- status ------------------------------------------------------------------------------

    def _publish_status(self) -> None:
        publisher, params = self._outputs.get("status"), self._params
        if publisher is None or params is None:
            return
        try:
            publisher.publish(
                diagnostics.status(
                    self.get_clock().now().to_msg(),
                    f"{self.get_fully_qualified_name()}: grounding",
                    self.state,
                    params,
                    self._worker,
                    self._stats,
                )
            )
        # after Ctrl-C a publish fails by design (and its error would be logged unread)
        except Exception:
            if self.context.ok():
                raise
