"""Backend registry: build a backend by name, importing heavy dependencies only when chosen."""

from __future__ import annotations

from typing import Any

import torch

from mapany_ros.core.backends.base import Backend, BackendError, ViewPrediction, WindowPrediction

BACKENDS = ("mapanything", "planesweep")

__all__ = ["BACKENDS", "Backend", "BackendError", "ViewPrediction", "WindowPrediction", "make_backend",
           "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("device is 'cuda' but torch sees no CUDA GPU: set device to 'auto' or 'cpu'")
    if device != "cpu" and not device.startswith("cuda"):
        raise BackendError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


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
