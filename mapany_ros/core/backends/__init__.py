"""Backend registry: build a backend by name, importing heavy dependencies only when chosen."""

from __future__ import annotations

from typing import Any

from mapany_ros.core.backends.base import Backend, BackendError, ViewPrediction, WindowPrediction, resolve_device

BACKENDS = ("mapanything", "planesweep")

__all__ = ["BACKENDS", "Backend", "BackendError", "ViewPrediction", "WindowPrediction", "make_backend",
           "resolve_device"]


def make_backend(name: str, device: str = "auto", **options: Any) -> Backend:
    """The backend called ``name`` on ``device``, configured by backend-specific ``options``."""
    dev = resolve_device(device)
    if name == "planesweep":
        from mapany_ros.core.backends.planesweep import PlaneSweepBackend

        return PlaneSweepBackend(device=dev, **options)
    if name == "mapanything":
        from mapany_ros.core.backends.mapanything import MapAnythingBackend, MapAnythingConfig

        return MapAnythingBackend(MapAnythingConfig(device=str(dev), **options))
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
