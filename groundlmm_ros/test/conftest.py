"""Test-run wide settings: never touch a model hub, give this run its own ROS domain so parallel
runs on one machine do not cross-talk, and a watchdog process that ends a test pytest-timeout
cannot.

pytest-timeout interrupts a test from a signal handler, which needs the GIL; a DDS teardown that
hangs while holding it (Fast DDS in rcl_node_fini) never lets it run. The watchdog is a separate
process: a test still running WATCHDOG_GRACE_S past its timeout gets its Python stacks dumped
(faulthandler, a C handler that needs no GIL) and the test run is killed with a line saying which
test hung. Every process the node tests start dies with the run (node_harness sets
PR_SET_PDEATHSIG).
"""

import faulthandler
import os
import signal
import subprocess
import sys

import pytest
import torch

# One torch thread per test process: tiny models run no faster on more, and two test runs on one
# small machine do not then fight over its cores.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Domains 1..200 keep clear of the default 0 (and of the port range limit near 232).
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))

WATCHDOG_GRACE_S = 30.0
WATCHDOG = """
import os, select, signal, sys, time
pid, deadline, seconds, test = int(sys.argv[1]), None, "", ""
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)  # the test run ended
        command, _, rest = line.strip().partition(" ")
        if command == "arm":
            seconds, _, test = rest.partition(" ")
            deadline = time.monotonic() + float(seconds)
        else:
            deadline = None
    elif deadline is not None:
        print(f"\\nwatchdog: {test} still ran after {seconds} s "
              f"(its timeout + {sys.argv[2]} s): pytest-timeout "
              "could not stop it (a hang that holds the GIL); its stacks follow, "
              "then the test run is killed",
              file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        sys.exit(0)
"""


def pytest_configure(config):
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config._groundlmm_watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(WATCHDOG_GRACE_S)],
        stdin=subprocess.PIPE,
        text=True,
    )


def pytest_unconfigure(config):
    watchdog = getattr(config, "_groundlmm_watchdog", None)
    if watchdog is not None:
        watchdog.stdin.close()
        watchdog.wait(5.0)


def _timeout_s(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 300)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    watchdog = item.config._groundlmm_watchdog
    # pytest-timeout's limit covers setup, call and teardown together; the grace lets its failure
    # unwind
    watchdog.stdin.write(f"arm {_timeout_s(item) + WATCHDOG_GRACE_S} {item.nodeid}\n")
    watchdog.stdin.flush()
    yield
    watchdog.stdin.write("disarm\n")
    watchdog.stdin.flush()
