"""The thin rclpy layer: node, parameters, message conversion, QoS, TF, DDS settings."""
