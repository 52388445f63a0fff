"""groundlmm_node's process (the `groundlmm_node` command): the DDS profile, rclpy, one
GroundingNode on a multi-threaded executor, autostart, and a quick, quiet exit on Ctrl-C or
SIGTERM (exit code 0), also while the model loads or the modules import.

With autostart (the default) a configure that fails ends the process with exit code 1 after its
error line, so `ros2 launch` reports the node as died instead of running on with nothing served.
With autostart:=false the node stays up, unconfigured, for a lifecycle manager to configure again.

    groundlmm_node --ros-args --params-file params.yaml
    python -m groundlmm_ros.ros.process --ros-args ...

Only the standard library is imported at the top: a Ctrl-C while rclpy, the node and torch load
ends the process like any other Ctrl-C, without a traceback.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import signal
import sys
from pathlib import Path

DDS_PROFILE = Path(__file__).with_name("fastdds_profile.xml")
# from SIGINT/SIGTERM to exit, at most (plus the faulthandler dump)
EXIT_TIMEOUT_S = 4.0
# Callbacks are short (a goal waits in the worker's queue, not on a thread); one runs with the
# model.
EXECUTOR_THREADS = 4


def use_node_dds_profile() -> None:
    """Before rclpy.init: this node's Fast DDS profile (default transports, a large shared-memory
    segment), unless the environment names its own profile file or another RMW."""
    if os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp").startswith("rmw_fastrtps"):
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(DDS_PROFILE))


def _interrupt(signum, frame) -> None:
    # SIGTERM ends the node as Ctrl-C does, also while the model loads
    raise KeyboardInterrupt


def main(args=None, engine_factory=None) -> None:
    """Run the node until Ctrl-C or SIGTERM. engine_factory: GroundingNode's (None: its default,
    the presets)."""
    use_node_dds_profile()
    # Ctrl-C ends the node also when it was started with SIGINT ignored (a background job of a
    # non-interactive shell), as ros2 launch sends SIGINT to stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # before rclpy.init, whose handler calls this one after its own
    signal.signal(signal.SIGTERM, _interrupt)
    # the node and its executor, once made: after _serve, _stop holds the last references
    running = {}
    code = 0
    try:
        code = _serve(args, engine_factory, running)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(running)
    # Python's own teardown of torch and the model code has nothing left to release but takes
    # seconds on a busy machine: skip it (only on this normal path; an error above still ends
    # with its traceback).
    sys.stdout.flush()
    sys.stderr.flush()
    # and what C code (the ROS logger) has buffered
    ctypes.CDLL(None).fflush(None)
    os._exit(code)


def _serve(args, engine_factory, running: dict) -> int:
    """Spin the node until the context shuts down: 0; 1 when autostart's configure failed."""
    # Imported here: a Ctrl-C while they load is the KeyboardInterrupt main ends on.
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from groundlmm_ros.ros.node import SUCCESS, GroundingNode

    rclpy.init(args=args)
    factory = {} if engine_factory is None else {"engine_factory": engine_factory}
    try:
        node = GroundingNode(**factory)
    except Exception:
        # A Ctrl-C since rclpy.init shut the context down (rclpy's own handler): the node cannot
        # be made in it, and that is no error.
        if rclpy.ok():
            raise
        return 0
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    # this frame's references go when it returns (or its KeyboardInterrupt is handled)
    running.update(node=node, executor=executor)
    if node.get_parameter("autostart").value:
        if node.trigger_configure() != SUCCESS:
            # a Ctrl-C while the model loaded: not a failed configure
            if not rclpy.ok():
                return 0
            node.get_logger().error(
                "autostart: configure failed, so the process ends (exit code 1); with "
                "autostart:=false the node stays up, unconfigured, to be configured again"
            )
            return 1
        node.trigger_activate()
    try:
        executor.spin()
    except ExternalShutdownException:
        pass
    return 0


def _stop(running: dict) -> None:
    """Stop the node quickly and leave the ROS graph at once."""
    # a second Ctrl-C must not interrupt the teardown
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # A DDS teardown can hang while holding the GIL (no Python timer runs then): faulthandler's
    # C thread prints every thread's stack and ends the process if this exit takes longer than
    # EXIT_TIMEOUT_S.
    faulthandler.dump_traceback_later(EXIT_TIMEOUT_S, exit=True)
    rclpy = sys.modules.get("rclpy")
    node, executor = running.pop("node", None), running.pop("executor", None)
    if node is not None and executor is not None:
        # Stop the worker (the running query is cancelled at its next token); the model's memory
        # goes with the process, so the slow part of shut_down (a full garbage collection to free
        # it) is skipped.
        node.stop_serving("the node is shutting down", worker_timeout_s=1.0)
        executor.shutdown(timeout_sec=0.5)
        node.destroy_node()
        rclpy.try_shutdown()
        context = node.context
        del node, executor
        # the node's reference cycles still hold the context
        gc.collect()
        # the DDS participant leaves the graph now (else only after its lease, 20 s)
        context.destroy()
    elif rclpy is not None:
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
