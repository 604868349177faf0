"""What camera drivers, wheel odometry and robot_state_publisher would publish, from a synthetic scene.

Publishes ``C/image_raw`` (rgb8) and ``C/camera_info`` of every camera ``C`` of the rig (one,
``camera``, by default), ``odom`` at a higher rate than the cameras (or, as odometry nodes that
publish only TF, odom -> base_link on /tf instead), and the static chain
base_link -> C_link -> C_optical_frame of every camera on /tf_static, all stamped on one timeline
(each camera with its own stamp offset) so the node sees what a real robot sends. Odometry can be exact or
what real wheel odometry is: drifting (:class:`~mapany_ros.sim.odometry.DriftingOdometry`),
late (published after the images it covers) and irregular (jittered intervals).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from mapany_ros.core.geometry import invert, make_pose
from mapany_ros.ros import conversions as conv
from mapany_ros.sim.odometry import DriftingOdometry
from mapany_ros.sim.scene import SyntheticSequence

#: REP 103: a camera_link (x forward, z up) to its optical frame (z forward, x right, y down).
T_LINK_OPTICAL = make_pose(Rotation.from_euler("xyz", [-90, 0, -90], degrees=True).as_matrix(), [0, 0, 0])

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


class SyntheticSource(Node):
    """Plays a :class:`SyntheticSequence` (or one per camera of a rig) onto ROS topics in (scaled) real time.

    ``seq``: one sequence, published as camera ``camera``, or a mapping camera name -> sequence
    (:func:`~mapany_ros.sim.scene.make_rig_sequences`): every camera under its own namespace with
    its own extrinsic and stamps. The attributes of a single camera (``seq``, ``camera``,
    ``image_pub``, ...) are those of the first.
    """

    def __init__(self, seq: SyntheticSequence | Mapping[str, SyntheticSequence], camera: str = "camera",
                 base_frame: str = "base_link", odom_frame: str = "odom", odom_rate_hz: float = 50.0,
                 stamp_offset_ns: int | None = None, odometry: DriftingOdometry | None = None,
                 odom_delay_s: float = 0.0, odom_jitter: float = 0.0, odom_as_tf: bool = False,
                 **node_kwargs) -> None:
        super().__init__("synthetic_source", **node_kwargs)
        self.sequences: dict[str, SyntheticSequence] = dict(seq) if isinstance(seq, Mapping) else {camera: seq}
        if not self.sequences:
            raise ValueError("need at least one camera's sequence")
        self.camera = next(iter(self.sequences))
        self.seq = self.sequences[self.camera]
        #: None: exact odometry (the scene's true base pose).
        self.drifting = odometry
        self.odom_delay_s = odom_delay_s
        self.odom_jitter = odom_jitter
        #: Odometry as the odom -> base transform on /tf only, no nav_msgs/Odometry.
        self.odom_as_tf = odom_as_tf
        self._rng = np.random.default_rng(0)
        self.base_frame, self.odom_frame = base_frame, odom_frame
        self.optical_frames = {c: f"{c}_optical_frame" for c in self.sequences}
        self.optical_frame = self.optical_frames[self.camera]
        self.odom_rate_hz = odom_rate_hz
        first_ns = min(s.frames[0].stamp_ns for s in self.sequences.values())
        # Stamps near the wall clock, as a live robot's, unless asked otherwise.
        self.stamp_offset_ns = time.time_ns() - first_ns if stamp_offset_ns is None else stamp_offset_ns
        self.image_pubs = {c: self.create_publisher(Image, f"{c}/image_raw", RELIABLE) for c in self.sequences}
        self.info_pubs = {c: self.create_publisher(CameraInfo, f"{c}/camera_info", RELIABLE) for c in self.sequences}
        self.image_pub, self.info_pub = self.image_pubs[self.camera], self.info_pubs[self.camera]
        self.odom_pub = self.create_publisher(Odometry, "odom", RELIABLE)
        self.tf_static_pub = self.create_publisher(TFMessage, "/tf_static", LATCHED)
        self.tf_pub = self.create_publisher(TFMessage, "/tf", RELIABLE)

    def stamp(self, t_ns: int) -> int:
        """The ROS stamp of sequence time ``t_ns``."""
        return self.stamp_offset_ns + t_ns

    def publish_static(self) -> None:
        now = self.stamp(min(s.frames[0].stamp_ns for s in self.sequences.values()))
        transforms = []
        for c, seq in self.sequences.items():
            T_base_link = seq.T_base_camera @ invert(T_LINK_OPTICAL)
            transforms += [
                conv.matrix_to_transform_stamped(T_base_link, self.base_frame, f"{c}_link", now),
                conv.matrix_to_transform_stamped(T_LINK_OPTICAL, f"{c}_link", self.optical_frames[c], now),
            ]
        self.tf_static_pub.publish(TFMessage(transforms=transforms))

    def odometry(self, t_ns: int) -> Odometry:
        msg = Odometry()
        msg.header = Header(stamp=conv.ns_to_stamp(self.stamp(t_ns)), frame_id=self.odom_frame)
        msg.child_frame_id = self.base_frame
        t = t_ns * 1e-9
        msg.pose.pose = conv.matrix_to_pose(self.drifting.pose(t) if self.drifting else self.seq.scene.base_pose(t))
        return msg

    def publish_odometry(self, t_ns: int) -> None:
        """The odometry at sequence time ``t_ns``: on ``odom``, or as TF only."""
        msg = self.odometry(t_ns)
        if self.odom_as_tf:
            self.tf_pub.publish(TFMessage(transforms=[conv.matrix_to_transform_stamped(
                conv.pose_to_matrix(msg.pose.pose), self.odom_frame, self.base_frame, self.stamp(t_ns))]))
        else:
            self.odom_pub.publish(msg)

    def publish_frame(self, index: int, image: Image | None = None, camera: str | None = None) -> None:
        """Publish image ``index`` of ``camera`` (default the first) with its camera_info."""
        c = self.camera if camera is None else camera
        seq = self.sequences[c]
        f = seq.frames[index]
        header = Header(stamp=conv.ns_to_stamp(self.stamp(f.stamp_ns)), frame_id=self.optical_frames[c])
        self.info_pubs[c].publish(conv.model_to_camera_info(seq.camera_model, header))
        self.image_pubs[c].publish(image if image is not None else conv.rgb_to_image_msg(f.rgb, header))

    def play(self, speed: float = 1.0, odom_lead_s: float = 0.05,
             on_image: Callable[[int], None] | None = None) -> None:
        """Publish every camera's whole sequence in stamp order; odometry runs ``odom_lead_s`` ahead of the images.

        ``on_image`` is called with each image's stamp right after it is published.
        """
        self.publish_static()
        # Every image of every camera, in stamp order (a rig's cameras a few milliseconds apart).
        images = sorted((f.stamp_ns, c, i) for c, seq in self.sequences.items() for i, f in enumerate(seq.frames))
        first_ns, last_ns = images[0][0], images[-1][0]
        # A camera driver publishes camera_info all the time; start with one so that the first
        # image is not dropped for lack of it.
        for c, seq in self.sequences.items():
            self.info_pubs[c].publish(conv.model_to_camera_info(seq.camera_model, Header(
                stamp=conv.ns_to_stamp(self.stamp(seq.frames[0].stamp_ns)), frame_id=self.optical_frames[c])))
        time.sleep(0.2)
        dt_odom = int(1e9 / self.odom_rate_hz)
        t_odom = first_ns - 2 * dt_odom
        lead_ns = int((odom_lead_s - self.odom_delay_s) * 1e9)
        start = time.monotonic()
        for stamp_ns, c, i in images:
            while t_odom <= stamp_ns + lead_ns:
                self.publish_odometry(t_odom)
                t_odom += int(dt_odom * (1.0 + self.odom_jitter * self._rng.uniform(-1.0, 1.0)))
            due = start + (stamp_ns - first_ns) * 1e-9 / speed
            time.sleep(max(0.0, due - time.monotonic()))
            self.publish_frame(i, camera=c)
            if on_image is not None:
                on_image(self.stamp(stamp_ns))
        while t_odom <= last_ns + max(lead_ns, 0) + dt_odom:  # late odometry still covers the last image
            self.publish_odometry(t_odom)
            t_odom += dt_odom
