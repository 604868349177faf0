"""Backend registry: built-ins by name, third-party models as plugins, heavy imports only when chosen.

A backend is any class constructed with the keyword ``device`` (a :class:`torch.device`) plus its
own options, with ``infer(frames) -> WindowPrediction`` (see :class:`Backend`). It is named by

* a built-in name (``planesweep``, ``mapanything``),
* a name registered by any installed package under the entry-point group ``mapany_ros.backends``
  (``[project.entry-points."mapany_ros.backends"] mymodel = "my_pkg.model:MyBackend"``), or
* an import path ``package.module:ClassName``.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

from mapany_ros.core.backends.base import Backend, BackendError, ViewPrediction, WindowPrediction, resolve_device

ENTRY_POINT_GROUP = "mapany_ros.backends"
#: The built-in backends and their classes (also registered as entry points by setup.py).
BUILTIN = {
    "mapanything": "mapany_ros.core.backends.mapanything:MapAnythingBackend",
    "planesweep": "mapany_ros.core.backends.planesweep:PlaneSweepBackend",
}
BACKENDS = tuple(BUILTIN)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")

__all__ = ["BACKENDS", "Backend", "BackendError", "ViewPrediction", "WindowPrediction", "backend_class",
           "is_backend_name", "make_backend", "resolve_device"]


def is_backend_name(name: str) -> bool:
    """True for a built-in or registered name, or a well-formed ``package.module:ClassName``."""
    return name in BUILTIN or bool(_IMPORT_PATH.match(name)) or name in _registered()


def _registered() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(name: str) -> type:
    """The class a backend name refers to, imported now; BackendError naming the fix otherwise."""
    target = BUILTIN.get(name) or _registered().get(name) or (name if _IMPORT_PATH.match(name) else None)
    if target is None:
        known = sorted(set(BUILTIN) | set(_registered()))
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(known)}, "
                           "or give a plugin as package.module:ClassName")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r}: cannot import module {module_name!r} ({exc}); install the package "
                           "that provides it, or fix the name") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise BackendError(f"backend {name!r}: module {module_name!r} has no class {class_name!r}")
    if not callable(getattr(cls, "infer", None)):
        raise BackendError(f"backend {name!r}: {target} has no infer(frames) method")
    return cls


def make_backend(name: str, device: str = "auto", **options: Any) -> Backend:
    """The backend called ``name`` on ``device``, configured by its own keyword ``options``."""
    dev = resolve_device(device)
    cls = backend_class(name)
    try:
        backend = cls(device=dev, **options)
    except BackendError:
        raise
    except TypeError as exc:
        raise BackendError(f"backend {name!r} does not take these options: {exc}") from exc
    except Exception as exc:  # a plugin's own start-up failure: one clear message, no second traceback
        raise BackendError(f"backend {name!r} failed to start: {type(exc).__name__}: {exc}") from exc
    if not hasattr(backend, "name"):
        backend.name = name  # type: ignore[attr-defined]
    return backend
