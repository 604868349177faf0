"""The simulated world: scenes and their renderer, a drifting odometry, the synthetic robot on ROS topics
and in bags, bag playback and recording, and a model simulator with a real model's errors.

Used by the demo, the tests and the benchmarks; the runtime (``core``, ``ros``) never imports it.
"""
