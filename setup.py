"""ament_python package definition; also installs with pip into a virtualenv (see README)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "mapany_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
    ],
    install_requires=["setuptools", "numpy", "scipy", "pillow", "rosbags", "gtsam"],
    extras_require={"test": ["pytest"]},
    python_requires=">=3.10",
    zip_safe=True,
    maintainer="mapany_ros maintainers",
    maintainer_email="maintainers@mapany-ros.dev",
    description="Metric multi-view 3D (MapAnything) for ROS 2 robots",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "mapany_node = mapany_ros.ros.node:main",
            "mapany-ros = mapany_ros.commands.cli:main",
        ],
        # Backends by name; third-party packages add theirs to the same group.
        "mapany_ros.backends": [
            "mapanything = mapany_ros.core.backends.mapanything:MapAnythingBackend",
            "planesweep = mapany_ros.core.backends.planesweep:PlaneSweepBackend",
        ],
    },
)
