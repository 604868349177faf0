"""What the node does with each input message, without rclpy: shared by mapany_node and offline processing.

Messages may be rclpy's or ones deserialised from a bag with ``rosbags`` (same field names), so a bag
processed offline goes through exactly the conversions, checks and warnings the live node applies.
Bad input is reported through ``warn(key, message)`` (the node throttles it per key) and dropped;
nothing else is lost.

The handler has no lock: the node calls it from its executor's one (mutually exclusive) callback
group, and it holds nothing while it calls the pipeline, which takes its own lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np

from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.pipeline import FrameStatus, Pipeline
from mapany_ros.core.tf_buffer import ChainSampler, SampledChain, TransformBuffer
from mapany_ros.ros import conversions as conv
from mapany_ros.ros.compressed import compressed_to_rgb
from mapany_ros.ros.params import NodeConfig
from mapany_ros.ros.tf_buffer import add_tf_message

#: Images per camera kept while its first camera_info has not come (the subscriptions race at start).
HELD_IMAGES = 10


class InputHandler:
    """camera_info, images (raw or compressed), depth priors, odometry, /tf_static and /tf into a :class:`Pipeline`.

    /tf_static and /tf fill one time-indexed transform tree. Each camera's extrinsic is the chain
    ``base_frame`` -> its images' optical frame: static, it is handed over once; moving (an edge on
    /tf, a pan-tilt head), as samples the pipeline interpolates at each image stamp. With
    ``odometry.source: tf`` odometry is the chain ``odom_frame`` -> ``base_frame``, sampled the same way.
    """

    def __init__(self, config: NodeConfig, pipeline: Pipeline, warn: Callable[[str, str], None]) -> None:
        self.config = config
        self.pipeline = pipeline
        self.warn = warn
        self.models: dict[str, CameraModel] = {}
        #: Recent registered depth images per camera, matched to colour images by stamp.
        self.depth_priors: dict[str, collections.deque[tuple[int, np.ndarray]]] = {
            cam: collections.deque(maxlen=10) for cam in config.pipeline.cameras}
        self.tf = TransformBuffer(buffer_s=config["tf.buffer_s"], max_gap_s=config["odometry.max_gap_s"],
                                  reset_jump_s=config["time.reset_jump_s"])
        #: Optical frame id last seen on each camera's images, and the sampler of its extrinsic chain.
        self.camera_frames: dict[str, str] = {}
        self._extrinsic_chains: dict[str, ChainSampler] = {}
        self._odometry_chain = ChainSampler(config["odom_frame"], config["base_frame"]) \
            if config["use_odometry"] and config["odometry.source"] == "tf" else None
        #: Images accepted per camera (for the input rate on /diagnostics).
        self.images: collections.Counter[str] = collections.Counter()
        #: Node-clock time of the newest image per camera (stale inputs).
        self.last_image_ns: dict[str, int] = {}
        #: Images that came before their camera's first camera_info (subscriptions are not ordered).
        self._held: dict[str, collections.deque[tuple[np.ndarray, Any, str, int]]] = {
            cam: collections.deque(maxlen=HELD_IMAGES) for cam in config.pipeline.cameras}

    # ------------------------------------------------------------------ camera_info, depth, TF
    def on_camera_info(self, cam: str, msg: Any) -> None:
        try:
            self.models[cam] = conv.camera_info_to_model(msg, rectified=self.config["image_rectified"])
        except conv.ConversionError as exc:
            self.warn(f"info/{cam}", f"{cam}/camera_info dropped: {exc}")
            return
        held = self._held.get(cam)
        while held:
            self._take_image(cam, *held.popleft())

    def on_depth_prior(self, cam: str, msg: Any) -> None:
        try:
            depth = conv.depth_image_to_array(msg)
        except conv.ConversionError as exc:
            self.warn(f"depth_prior/{cam}", f"{cam}/depth_prior dropped: {exc}")
            return
        self.depth_priors[cam].append((conv.stamp_to_ns(msg.header.stamp), depth))

    def _matching_depth(self, cam: str, stamp_ns: int, size: tuple[int, int]) -> np.ndarray | None:
        """The registered depth image with the colour image's stamp (within sync tolerance), if any."""
        tol = int(self.config["sync.tolerance_s"] * 1e9)
        for t, depth in reversed(self.depth_priors.get(cam, ())):
            if abs(t - stamp_ns) <= tol:
                if depth.shape != (size[1], size[0]):
                    self.warn(f"depth_prior_size/{cam}", f"{cam}/depth_prior is {depth.shape[1]}x{depth.shape[0]}, "
                              f"image is {size[0]}x{size[1]}: depth must be registered to the colour camera")
                    return None
                return depth
        return None

    def on_tf_static(self, msg: Any) -> None:
        try:
            add_tf_message(self.tf, msg, static=True)
        except conv.ConversionError as exc:
            self.warn("tf_static", f"/tf_static transform dropped: {exc}")
        for cam in self.config.pipeline.cameras:
            self._update_extrinsic(cam)
        self._update_odometry(None)

    def on_tf(self, msg: Any) -> int:
        """A /tf message: moving extrinsics and, with ``odometry.source: tf``, odometry.

        Returns how many odometry samples it gave. Transforms under ``map_frame`` are the node's own
        output and are ignored.
        """
        try:
            children = add_tf_message(self.tf, msg, static=False, skip_parents=(self.config["map_frame"],))
        except conv.ConversionError as exc:
            self.warn("tf", f"/tf transform dropped: {exc}")
            children = None  # the good ones were stored: look at every chain
        for cam in self.config.pipeline.cameras:
            self._update_extrinsic(cam, children)
        return self._update_odometry(children)

    def _update_extrinsic(self, cam: str, children: set[str] | None = None) -> None:
        """Hand the pipeline what is new on the camera's extrinsic chain (``children``: the frames a /tf
        message changed; None: look anyway)."""
        frame_id = self.camera_frames.get(cam)
        if frame_id is None:
            return
        chain = self._extrinsic_chains.get(cam)
        if chain is None or chain.source != frame_id:
            chain = self._extrinsic_chains[cam] = ChainSampler(self.config["base_frame"], frame_id)
        update = self._sample(chain, children)
        if update.static is not None:
            self.report(self.pipeline.set_extrinsic(cam, update.static), cam)
        for stamp, T in update.samples:
            self.report(self.pipeline.add_extrinsic(cam, stamp, T), cam)

    def _update_odometry(self, children: set[str] | None) -> int:
        """With ``odometry.source: tf``: new samples of odom_frame -> base_frame into the pipeline."""
        if self._odometry_chain is None:
            return 0
        update = self._sample(self._odometry_chain, children)
        for stamp, T in update.samples:
            try:
                statuses = self.pipeline.add_odometry(stamp, T)
            except ValueError as exc:
                self.warn("odom", f"/tf odometry sample dropped: {exc}")
                continue
            self.report(statuses)
        return len(update.samples)

    def _sample(self, chain: ChainSampler, children: set[str] | None) -> SampledChain:
        """The chain's news, looked at only when the message touched one of its edges."""
        if children is not None:
            edges = chain.edges(self.tf)
            if edges is None or not children.intersection(edges):
                return SampledChain()
        return chain.update(self.tf)

    # ------------------------------------------------------------------ odometry
    def on_odometry(self, msg: Any) -> None:
        odom_frame, base_frame = self.config["odom_frame"], self.config["base_frame"]
        parent, child = msg.header.frame_id.lstrip("/"), msg.child_frame_id.lstrip("/")
        if parent != odom_frame or (child and child != base_frame):
            self.warn("odom_frames", f"odom message dropped: it is {parent!r} -> {child!r}, the node expects "
                      f"{odom_frame!r} -> {base_frame!r} (set odom_frame / base_frame)")
            return
        try:
            T = conv.odometry_to_matrix(msg)
            covariance = self._covariance(msg)
            statuses = self.pipeline.add_odometry(conv.stamp_to_ns(msg.header.stamp), T, covariance)
        except (conv.ConversionError, ValueError) as exc:
            self.warn("odom", f"odom message dropped: {exc}")
            return
        self.report(statuses)

    def _covariance(self, msg: Any) -> np.ndarray | None:
        """The message's 6x6 pose covariance with ``odometry.use_covariance`` (None otherwise, or when it is
        not finite: the pose itself is still good, the parametric noise then applies)."""
        if not self.config["odometry.use_covariance"]:
            return None
        cov = np.asarray(msg.pose.covariance, dtype=np.float64)
        if cov.size != 36 or not np.all(np.isfinite(cov)):
            self.warn("odom_covariance", "odom pose covariance ignored: it is not 36 finite numbers "
                      "(odometry.sigma_* apply to these samples)")
            return None
        return cov.reshape(6, 6)

    # ------------------------------------------------------------------ images
    def on_image(self, cam: str, msg: Any, now_ns: int) -> None:
        """A sensor_msgs/Image of camera ``cam``."""
        try:
            rgb = conv.image_to_rgb(msg)
        except conv.ConversionError as exc:
            self.warn(f"image/{cam}", f"{cam}/image_raw dropped: {exc}")
            return
        self._take_image(cam, rgb, msg.header, "image_raw", now_ns)

    def on_compressed_image(self, cam: str, msg: Any, now_ns: int) -> None:
        """A sensor_msgs/CompressedImage (image_transport's compressed transport) of camera ``cam``."""
        try:
            rgb = compressed_to_rgb(msg)
        except conv.ConversionError as exc:
            self.warn(f"image/{cam}", f"{cam}/image_raw/compressed dropped: {exc}")
            return
        self._take_image(cam, rgb, msg.header, "image_raw/compressed", now_ns)

    def _take_image(self, cam: str, rgb: np.ndarray, header: Any, topic: str, now_ns: int) -> None:
        model = self.models.get(cam)
        if model is None:  # held until the camera_info comes; the oldest goes when too many wait
            held = self._held[cam]
            if len(held) == held.maxlen:
                self.warn(f"noinfo/{cam}", f"{cam}/{topic} dropped: no {cam}/camera_info received yet")
            held.append((rgb, header, topic, now_ns))
            return
        h, w = rgb.shape[:2]
        if (w, h) != (model.width, model.height):
            self.warn(f"size/{cam}", f"{cam}/{topic} dropped: image is {w}x{h} but "
                      f"{cam}/camera_info says {model.width}x{model.height}")
            return
        if not header.frame_id:
            self.warn(f"frame/{cam}", f"{cam}/{topic} dropped: empty header.frame_id")
            return
        self.images[cam] += 1
        self.last_image_ns[cam] = now_ns
        if self.camera_frames.get(cam) != header.frame_id:  # used without odometry too: the map's REP 103 axes
            self.camera_frames[cam] = header.frame_id
            self._update_extrinsic(cam)
        stamp = conv.stamp_to_ns(header.stamp)
        frame = Frame(rgb, stamp, cam, header.frame_id, model, depth=self._matching_depth(cam, stamp, (w, h)))
        status, _ = self.pipeline.add_frame(frame)
        self.report([status], cam)

    def report(self, statuses: list[FrameStatus], cam: str = "") -> None:
        for s in statuses:
            if s is FrameStatus.DROPPED_NO_EXTRINSIC:
                self.warn("extrinsic", f"image dropped: no transform {self.config['base_frame']} -> the camera's "
                          "optical frame on /tf_static or /tf at its stamp (needed with use_odometry)")
            elif s not in (FrameStatus.ACCEPTED, FrameStatus.WAITING):
                self.warn(f"status/{s.name}", f"{cam + ' ' if cam else ''}image dropped: {s.value}")
