# Quickstart: `make demo` and `make test`. Both build .venv when it is missing.
#
# Every ROS 2 process started from here keeps DDS on this machine: localhost discovery, a
# FastDDS profile with shared memory + UDP on 127.0.0.1 only, and a random domain per run.

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mapany_ros-installed

export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE := $(CURDIR)/config/fastdds_localhost.xml
export RMW_IMPLEMENTATION := rmw_fastrtps_cpp
# 1..100: the domain's DDS ports then stay below the OS's ephemeral port range.
export ROS_DOMAIN_ID ?= $(shell $(PYTHON) -c 'import random; print(random.randint(1, 100))')
export ROS_LOG_DIR ?= $(CURDIR)/out/ros_log
export AMENT_PREFIX_PATH := $(VENV)$(if $(AMENT_PREFIX_PATH),:$(AMENT_PREFIX_PATH))
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test bench bench-gpu lint venv clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py package.xml deps/build_tf2_msgs.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	bash deps/build_tf2_msgs.sh $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mapany_ros.commands.demo

# pytest exits 5 when it collected no test: make fails on it like on any other error.
test: $(STAMP)
	$(VENV)/bin/ruff check mapany_ros test launch
	$(PY) -m pytest test

# BENCH_PY: another interpreter with this package installed, e.g. one that also has upstream
# MapAnything (then set MAPANY_BENCH_MODEL_PATH to measure the adapter against real `infer`).
BENCH_PY ?= $(PY)
bench: $(STAMP)
	$(BENCH_PY) -m mapany_ros.bench

# The MapAnything path (upstream infer, adapter, pipeline, fusion) on the device torch sees, with
# upstream's architecture and random weights. BENCH_PY needs upstream MapAnything (with its configs/)
# and hydra-core; DINOv2 hub code in $TORCH_HOME/hub or BENCH_GPU_ARGS="--cache-dir DIR". CPU: --size reduced.
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	mkdir -p out
	$(BENCH_PY) -m mapany_ros.bench.gpu --out out/bench_gpu.md --json out/bench_gpu.json $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mapany_ros test launch

clean:
	rm -rf $(VENV) out build install log *.egg-info
