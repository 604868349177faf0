"""Restore environment variables after code that sets them (rclpy settings, backend caches)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def saved_environ(keys: Iterable[str]) -> Iterator[None]:
    """Put ``keys`` back as they were (or remove them) when the block ends, whatever set them."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
