"""The node's Fast DDS profile as installed, for the other processes on the node's host.

A camera driver started with Fast DDS's default profile sends a camera-sized frame over UDP
(it does not fit the default 512 KiB shared-memory segment), and a best-effort subscription
loses every frame that misses a fragment; started with this profile it sends through shared
memory (bench/transport.py measures both). Give it to a driver with

  export FASTDDS_DEFAULT_PROFILES_FILE=$(ros2 pkg prefix --share groundlmm_ros)/fastdds_profile.xml

or start the driver in the same launch as groundlmm.launch.py, which sets that variable.
"""

from __future__ import annotations

from pathlib import Path

from ament_index_python.packages import get_package_share_directory

PROFILE_FILE = "fastdds_profile.xml"


def installed_profile() -> Path:
    """share/groundlmm_ros/fastdds_profile.xml of the groundlmm_ros found on AMENT_PREFIX_PATH
    (PackageNotFoundError when none is)."""
    return Path(get_package_share_directory("groundlmm_ros")) / PROFILE_FILE
