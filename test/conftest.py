"""Shared fixtures: every ROS 2 participant a test starts stays on this machine.

DDS settings are read by ``rclpy.init()``, so they must be in the environment before any test
initialises ROS: a session-wide autouse fixture applies the localhost FastDDS profile, a
random ROS domain for this run (parallel runs on one machine do not see each other) and a
temporary ROS_LOG_DIR (``rclpy.init()`` fails without HOME otherwise, and test logs should not
pile up in ~/.ros).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from saved_environ import saved_environ

from mapany_ros.ros.dds import DDS_ENV_VARS, apply_localhost_dds, localhost_dds_env, random_domain_id

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def localhost_dds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Localhost-only DDS env (profile, discovery range, fresh domain id, log dir) for the run.

    The previous environment is restored at the end of the session.
    """
    with saved_environ(DDS_ENV_VARS):
        os.environ["ROS_LOG_DIR"] = str(tmp_path_factory.mktemp("ros_log"))
        yield apply_localhost_dds(random_domain_id())


@pytest.fixture(scope="session")
def ros_subprocess_env(localhost_dds: dict[str, str]) -> dict[str, str]:
    """Environment for a child ROS process: same domain and profile, and this checkout importable."""
    env = {**os.environ, **localhost_dds_env(int(localhost_dds["ROS_DOMAIN_ID"]))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def rclpy_context(localhost_dds: dict[str, str]) -> Iterator[Any]:
    """A fresh, initialised rclpy Context, shut down after the test.

    Its own context (not the global one) keeps tests independent: create nodes with
    ``rclpy.create_node(name, context=rclpy_context)`` and executors with
    ``SingleThreadedExecutor(context=rclpy_context)``.
    """
    rclpy = pytest.importorskip("rclpy", reason="rclpy (ros-rclpy wheels) is not installed")
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)


@pytest.fixture
def harness_factory(rclpy_context: Any) -> Iterator[Any]:
    """Builds :class:`node_harness.Harness` objects (mapany_node + driver + collector), closed after the test."""
    from node_harness import Harness

    made = []

    def make(fake_backend: Any = None, **params: Any) -> Harness:
        h = Harness(rclpy_context, fake_backend, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a module of small tensors (maps, grids, tracking, tiny images).

    One thread is faster there, and immune to a busy second core: torch's busy-waiting OpenMP
    workers made such runs 5-10x slower on a 2-core machine shared with other work. Modules take
    it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
