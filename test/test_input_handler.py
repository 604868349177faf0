"""The node's input handling without DDS: /tf chains with intermediate frames, odometry from TF, covariance.

Messages are rclpy's, handed to :class:`InputHandler` as the subscriptions (or offline processing)
would; the pipeline runs synchronously with a recording backend.
"""

from __future__ import annotations

import numpy as np
from core_fakes import RecordingBackend
from nav_msgs.msg import Odometry
from scipy.spatial.transform import Rotation
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.frames import CameraModel
from mapany_ros.core.geometry import make_pose
from mapany_ros.core.pipeline import Pipeline
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.inputs import InputHandler
from mapany_ros.ros.params import PARAMETERS, validate

T0 = 1_700_000_000 * 10**9
MODEL = CameraModel(32, 24, np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]]), "plumb_bob", np.zeros(5))
T_LINK_OPTICAL = make_pose(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0, 0, 0])


def handler(**params):
    values = {p.name: p.default for p in PARAMETERS}
    values.update({"backend": "planesweep", "window.size": 3, "window.overlap": 1, "keyframe.min_translation_m": 0.0,
                   "keyframe.max_interval_s": 0.01, "window.queue_size": 16, **params})
    config = validate(values)
    backend = RecordingBackend()
    pipeline = Pipeline(config.pipeline, backend, lambda r: None)
    warnings: list[str] = []
    inputs = InputHandler(config, pipeline, lambda key, message: warnings.append(key))
    inputs.on_camera_info("camera", conv.model_to_camera_info(MODEL, Header(frame_id="camera_optical_frame")))
    return inputs, pipeline, backend, warnings


def ns(t: float) -> int:
    return T0 + int(round(t * 1e9))


def tf(*edges: tuple[str, str, float, np.ndarray]) -> TFMessage:
    return TFMessage(transforms=[conv.matrix_to_transform_stamped(T, parent, child, ns(t)) for parent, child, t, T
                                 in edges])


def image(inputs: InputHandler, t: float) -> None:
    msg = conv.rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8), Header(stamp=conv.ns_to_stamp(ns(t)),
                                                                        frame_id="camera_optical_frame"))
    inputs.on_image("camera", msg, ns(t))


def frames_seen(pipeline: Pipeline, backend: RecordingBackend) -> dict[int, object]:
    pipeline.flush()
    pipeline.process_ready()
    return {f.stamp_ns: f for call in backend.calls for f in call}


def odom_truth(t: float) -> np.ndarray:
    return make_pose(Rotation.from_euler("z", 0.3 * t).as_matrix(), [0.5 * t, 0.1 * t, 0.0])


def tilt(t: float) -> np.ndarray:  # a head tilting at a constant 0.6 rad/s (slerp is exact for it)
    return make_pose(Rotation.from_euler("y", 0.6 * (t - 1.5)).as_matrix(), [0.0, 0.0, 0.0])


def test_odometry_through_an_intermediate_frame_and_a_tilting_camera_from_tf():
    """odom -> base_footprint (moving) -> base_link (static), and base_link -> mast (static) -> tilt joint
    (moving) -> camera_link -> optical (static): each frame gets both chains at its own stamp."""
    inputs, pipeline, backend, warnings = handler(**{"odometry.source": "tf"})
    T_fp_base = make_pose(np.eye(3), [0.0, 0.0, 0.1])
    T_base_mast = make_pose(np.eye(3), [0.2, 0.0, 0.8])
    T_tilt_link = make_pose(np.eye(3), [0.06, 0.0, 0.03])
    inputs.on_tf_static(tf(("base_footprint", "base_link", 0.0, T_fp_base), ("base_link", "mast", 0.0, T_base_mast),
                           ("camera_link", "camera_optical_frame", 0.0, T_LINK_OPTICAL)))
    truth = {}
    for i in range(12):
        t = 1.0 + 0.1 * i
        for s in (t, t + 0.05):  # the odometry node and robot_state_publisher, 20 Hz each, one message each
            fed = inputs.on_tf(tf(("odom", "base_footprint", s, odom_truth(s) @ np.linalg.inv(T_fp_base))))
            assert fed == 1  # one odometry sample per odometry transform, never twice
            inputs.on_tf(tf(("mast", "tilt", s, tilt(s)), ("tilt", "camera_link", s, T_tilt_link)))
        inputs.on_tf(tf(("map", "odom", t, make_pose(np.eye(3), [5.0, 0, 0]))))  # the node's own output: ignored
        image(inputs, t + 0.02)
        truth[ns(t + 0.02)] = (odom_truth(t + 0.02), T_base_mast @ tilt(t + 0.02) @ T_tilt_link @ T_LINK_OPTICAL)
    seen = frames_seen(pipeline, backend)
    assert sorted(seen) == sorted(truth) and warnings == []
    for stamp, f in seen.items():
        T_odom_base, T_base_camera = truth[stamp]
        np.testing.assert_allclose(f.T_world_base, T_odom_base, atol=2e-4)  # 20 Hz samples: chord against arc
        np.testing.assert_allclose(f.T_base_camera, T_base_camera, atol=1e-4)
        np.testing.assert_allclose(f.T_world_camera, T_odom_base @ T_base_camera, atol=3e-4)
    assert len(pipeline.odometry) == 24  # deduplicated: 24 samples for 24 transforms


def test_odometry_covariance_reaches_the_frames_only_when_asked_for():
    cov_at = {0.9: np.diag([0.01, 0.01, 1e-6, 1e-6, 1e-6, 0.002]), 1.1: np.diag([0.03, 0.02, 1e-6, 1e-6, 1e-6, 0.004])}
    for use in (True, False):
        inputs, pipeline, backend, warnings = handler(**{"odometry.use_covariance": use})
        inputs.on_tf_static(tf(("base_link", "camera_optical_frame", 0.0, T_LINK_OPTICAL)))
        for t, cov in cov_at.items():
            msg = Odometry(header=Header(stamp=conv.ns_to_stamp(ns(t)), frame_id="odom"), child_frame_id="base_link")
            msg.pose.pose = conv.matrix_to_pose(odom_truth(t))
            msg.pose.covariance = cov.ravel().tolist()
            inputs.on_odometry(msg)
        bad = Odometry(header=Header(stamp=conv.ns_to_stamp(ns(1.2)), frame_id="odom"), child_frame_id="base_link")
        bad.pose.pose = conv.matrix_to_pose(odom_truth(1.2))
        bad.pose.covariance[0] = float("nan")
        inputs.on_odometry(bad)
        image(inputs, 1.0)
        image(inputs, 1.15)
        seen = frames_seen(pipeline, backend)
        assert sorted(seen) == [ns(1.0), ns(1.15)]
        if use:
            np.testing.assert_allclose(seen[ns(1.0)].odometry_covariance, (cov_at[0.9] + cov_at[1.1]) / 2)
            assert seen[ns(1.15)].odometry_covariance is None  # the next sample's covariance was not usable
            assert warnings == ["odom_covariance"]
        else:
            assert all(f.odometry_covariance is None for f in seen.values()) and warnings == []


def test_the_path_goes_on_while_the_first_camera_is_silent():
    """The path follows each group's first camera: with ``cameras[0]`` silent, the other camera carries it."""
    from core_fakes import base_pose, frame

    from mapany_ros.ros.outputs import OutputBuilder

    values = {p.name: p.default for p in PARAMETERS}
    values.update({"backend": "planesweep", "cameras": ["left", "right"], "window.size": 3, "window.overlap": 1,
                   "keyframe.min_translation_m": 0.05, "sync.tolerance_s": 0.01})
    config = validate(values)
    results = []
    pipeline = Pipeline(config.pipeline, RecordingBackend(), results.append)
    for cam in ("left", "right"):
        pipeline.set_extrinsic(cam, T_LINK_OPTICAL)
    pipeline.add_odometry(0, base_pose(0.0))
    for i in range(60):  # the left camera is silent from 2 s to 4 s
        t = round(0.1 * i, 3)
        pipeline.add_odometry(int(round((t + 0.1) * 1e9)), base_pose(0.5 * (t + 0.1)))
        if not 2.0 <= t < 4.0:
            pipeline.add_frame(frame(t, "left"))
        pipeline.add_frame(frame(t + 0.003, "right"))
        pipeline.process_ready()
    pipeline.flush()
    pipeline.process_ready()
    outputs = OutputBuilder(config)
    for result in results:
        outputs.window(result)
    stamps = [s * 1e-9 for s in outputs.path_stamps()]
    during = [s for s in stamps if 3.05 < s < 4.0]
    assert len(during) >= 4 and all(round(s * 1000) % 100 == 3 for s in during)  # the right camera's stamps
    assert max(stamps) > 5.5 and all(round(s * 1000) % 100 == 0 for s in stamps if s > 4.2)  # left again
