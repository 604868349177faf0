"""Keep ROS 2 / FastDDS traffic on this machine.

With default settings FastDDS multicasts discovery (239.255.0.1) and sends unicast to every
network interface; kilted ignores ``ROS_LOCALHOST_ONLY``. Two things are needed together,
exported before ``rclpy.init()`` in every process: ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``
(the rmw drops the multicast discovery locators) and a FastDDS XML profile whose default
participant uses only shared memory and UDPv4 on 127.0.0.1 (``config/fastdds_localhost.xml``).
Each run also gets its own ``ROS_DOMAIN_ID`` so parallel test runs do not see each other, and a
``ROS_LOG_DIR`` because ``rclpy.init()`` fails without ``HOME`` otherwise.

Nothing here imports rclpy: this module must be usable before ROS is initialised.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

PROFILE_NAME = "fastdds_localhost.xml"
PACKAGE_NAME = "mapany_ros"

#: Every variable :func:`localhost_dds_env` returns.
DDS_ENV_VARS = (
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "RMW_IMPLEMENTATION",
    "ROS_DOMAIN_ID",
    "ROS_LOG_DIR",
)

#: Variables that are always forced, whatever the environment says, because leaving them
#: unset or different would let DDS traffic leave the machine.
ENFORCED_VARS = ("ROS_AUTOMATIC_DISCOVERY_RANGE",)


def find_profile() -> Path:
    """Absolute path of ``fastdds_localhost.xml``.

    Looks first next to the package source (``<repo>/config/``, for a checkout or an editable
    install), then in the ament share directory (``share/mapany_ros/config/`` as installed by
    setup.py as package data), then in ``<sys.prefix>/share`` for a pip install whose prefix is
    not on ``AMENT_PREFIX_PATH``. Raises FileNotFoundError naming every place tried.
    """
    candidates = []
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "package.xml").is_file():  # a checkout, not site-packages
        candidates.append(source_root / "config" / PROFILE_NAME)
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory(PACKAGE_NAME)) / "config" / PROFILE_NAME)
        except (PackageNotFoundError, LookupError, ValueError, OSError):
            pass
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE_NAME / "config" / PROFILE_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"FastDDS localhost profile {PROFILE_NAME} not found; tried {tried}")


def random_domain_id() -> int:
    """A ROS domain id in 1..100, avoiding the default 0.

    FastDDS listens on 7400 + 250 * id and the following ports; up to id 100 these stay below
    Linux's ephemeral range (32768+), where the sockets the OS hands out at random could collide.
    """
    return random.SystemRandom().randint(1, 100)


def default_log_dir() -> str:
    """ROS_LOG_DIR to use when none is set: a per-user folder in the temp directory.

    Setting it unconditionally avoids ``rclpy.init()`` failing when ``HOME`` is unset.
    """
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return str(Path(tempfile.gettempdir()) / f"mapany_ros-ros-log-{uid}")


def localhost_dds_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment variables that confine ROS 2 (FastDDS) to this machine.

    Meant for ``subprocess`` environments: ``env = {**os.environ, **localhost_dds_env(d)}``.
    ``domain_id`` None picks a random id in 1..100. ``ROS_LOG_DIR`` keeps the current value
    when there is one. ``RMW_IMPLEMENTATION`` is pinned to FastDDS because the profile only
    means something to FastDDS.
    """
    if domain_id is None:
        domain_id = random_domain_id()
    if not 0 <= int(domain_id) <= 232:
        raise ValueError(f"ROS_DOMAIN_ID must be in 0..232, got {domain_id}")
    return {
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(find_profile()),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "ROS_DOMAIN_ID": str(int(domain_id)),
        "ROS_LOG_DIR": os.environ.get("ROS_LOG_DIR") or default_log_dir(),
    }


def apply_localhost_dds(domain_id: int | None = None) -> dict[str, str]:
    """Put the localhost DDS settings into ``os.environ``; call before ``rclpy.init()``.

    ``ROS_AUTOMATIC_DISCOVERY_RANGE`` is always forced to LOCALHOST. The other variables are
    only set where not already set, so a caller's own profile, rmw, or log dir wins; an
    explicit ``domain_id`` argument overrides an inherited ``ROS_DOMAIN_ID`` (the caller asked
    for it), None keeps an inherited one or picks a random id. Returns the values in effect.
    """
    wanted = localhost_dds_env(domain_id)
    for key, value in wanted.items():
        force = key in ENFORCED_VARS or (key == "ROS_DOMAIN_ID" and domain_id is not None)
        if force or not os.environ.get(key):
            os.environ[key] = value
    if wanted["ROS_LOG_DIR"] == os.environ["ROS_LOG_DIR"]:
        Path(wanted["ROS_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in wanted}
