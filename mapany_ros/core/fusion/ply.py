"""Binary little-endian PLY of coloured points with a confidence, in numpy (no extra dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

#: What write_ply writes, in this order; read_ply needs these names, in any order and scalar type.
_FIELDS = (
    ("x", "<f4"),
    ("y", "<f4"),
    ("z", "<f4"),
    ("red", "u1"),
    ("green", "u1"),
    ("blue", "u1"),
    ("confidence", "<f4"),
)
_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray, confidence: np.ndarray) -> None:
    """Write points as x y z (float), red green blue (uchar), confidence (float) vertices."""
    xyz, rgb, confidence = np.asarray(xyz), np.asarray(rgb), np.asarray(confidence)
    n = len(xyz)
    if xyz.shape != (n, 3) or rgb.shape != (n, 3) or confidence.shape != (n,):
        raise ValueError(
            f"need xyz (n, 3), rgb (n, 3) and confidence (n,), got {xyz.shape}, {rgb.shape}, {confidence.shape}"
        )
    rows = np.empty(n, dtype=np.dtype(list(_FIELDS)))
    for axis, name in enumerate(("x", "y", "z")):
        rows[name] = xyz[:, axis]
    for axis, name in enumerate(("red", "green", "blue")):
        rows[name] = rgb[:, axis]
    rows["confidence"] = confidence
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {'uchar' if t == 'u1' else 'float'} {name}" for name, t in _FIELDS]
    with open(path, "wb") as fh:
        fh.write(("\n".join([*header, "end_header"]) + "\n").encode("ascii"))
        rows.tofile(fh)


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyz float32 (N, 3), rgb uint8 (N, 3), confidence float32 (N,)) of a binary little-endian PLY.

    The vertex element must come first and carry x, y, z, red, green, blue and confidence; a
    file without confidence is refused rather than given a made-up one.
    """
    with open(path, "rb") as fh:
        n, dtype = _parse_header(fh, str(path))
        rows = np.fromfile(fh, dtype=dtype, count=n)
    if len(rows) != n:
        raise ValueError(f"{path}: the header announces {n} vertices, the file holds {len(rows)}")
    xyz = np.stack([rows[a] for a in ("x", "y", "z")], axis=1).astype(np.float32)
    rgb = np.stack([rows[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
    return xyz, rgb, rows["confidence"].astype(np.float32)


def _parse_header(fh: BinaryIO, name: str) -> tuple[int, np.dtype]:
    """Vertex count and record type from a PLY header; leaves ``fh`` at the first vertex."""
    if fh.readline().strip() != b"ply":
        raise ValueError(f"{name}: not a PLY file")
    n: int | None = None
    props: list[tuple[str, str]] = []
    in_vertex = ended = False
    for raw in iter(fh.readline, b""):
        words = raw.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            ended = True
            break
        if words[0] == "format" and words[1:2] != ["binary_little_endian"]:
            raise ValueError(f"{name}: only binary_little_endian PLY is supported, got {' '.join(words[1:])}")
        if words[0] == "element":
            if n is None and words[1:2] != ["vertex"]:
                raise ValueError(f"{name}: the vertex element must come first")
            in_vertex = n is None
            n = int(words[2]) if in_vertex else n
        elif words[0] == "property" and in_vertex:
            if words[1] not in _TYPES:
                raise ValueError(f"{name}: unsupported vertex property {' '.join(words[1:])}")
            props.append((words[2], _TYPES[words[1]]))
    missing = sorted({f for f, _ in _FIELDS} - {p for p, _ in props})
    if not ended or n is None or missing:
        raise ValueError(f"{name}: need a complete header with a vertex element of {[f for f, _ in _FIELDS]}; "
                         f"missing {missing or 'end_header'}")
    return n, np.dtype(props)
