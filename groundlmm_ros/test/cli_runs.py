"""The `groundlmm` command in a process of its own, as a user runs it (bounded in time)."""

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "groundlmm_ros.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
