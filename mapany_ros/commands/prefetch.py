"""``mapany-ros prefetch``: fill an offline cache with everything the MapAnything backend loads.

A robot usually has no internet, and MapAnything needs two things from it: the checkpoint
(config.json + model.safetensors from Hugging Face) and the DINOv2 *code* from GitHub, through
which upstream builds its encoder even when the weights come from the checkpoint. This command
fetches both into one directory that can be copied to the robot; the node then runs with
``cache_dir`` pointing at it and never touches the network. DINOv2 weights are not downloaded.

Layout: ``DIR/huggingface`` (HF hub cache) and ``DIR/torch`` (TORCH_HOME, code in
``DIR/torch/hub/facebookresearch_dinov2_main``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mapany_ros.core.backends.mapanything import (
    DINOV2_HUB_DIR,
    DINOV2_HUB_REPO,
    MODEL_FILES,
    MapAnythingConfig,
    hf_cache_dir,
    torch_home,
)

DEFAULT_MODEL_ID = MapAnythingConfig.model_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mapany-ros prefetch",
        description="Download the MapAnything checkpoint and the DINOv2 hub code for offline use.",
    )
    parser.add_argument(
        "--cache-dir", required=True, type=Path, help="directory to fill (created if missing)"
    )
    parser.add_argument(
        "--model-id",
        default=DEFAULT_MODEL_ID,
        help=f"Hugging Face model id (default {DEFAULT_MODEL_ID}; facebook/map-anything is CC-BY-NC)",
    )
    parser.add_argument("--force", action="store_true", help="download again even when cached")
    return parser


def download_checkpoint(cache_dir: Path, model_id: str, force: bool = False) -> Path:
    """Snapshot of config.json + model.safetensors in the HF cache under ``cache_dir``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise RuntimeError("prefetch needs huggingface_hub: pip install huggingface_hub") from exc
    path = Path(
        snapshot_download(
            model_id,
            cache_dir=str(hf_cache_dir(str(cache_dir))),
            allow_patterns=list(MODEL_FILES),
            force_download=force,
        )
    )
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise RuntimeError(
            f"{model_id} has no {', '.join(missing)}: only safetensors checkpoints are supported"
        )
    return path


def download_dinov2_code(cache_dir: Path, force: bool = False) -> Path:
    """The facebookresearch/dinov2 repository code (no weights) under ``cache_dir/torch/hub``."""
    import torch

    hub = torch_home(str(cache_dir)) / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    torch.hub.set_dir(str(hub))
    # list() fetches and imports hubconf.py only: the code, not a single weight file.
    torch.hub.list(f"{DINOV2_HUB_REPO}:main", force_reload=force, trust_repo=True)
    repo = hub / DINOV2_HUB_DIR
    if not (repo / "hubconf.py").is_file():
        raise RuntimeError(f"torch.hub did not leave the DINOv2 code at {repo}")
    return repo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mapany-ros prefetch``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    cache_dir = args.cache_dir.expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        snapshot = download_checkpoint(cache_dir, args.model_id, args.force)
        print(f"checkpoint {args.model_id}: {snapshot}")
        repo = download_dinov2_code(cache_dir, args.force)
        print(f"DINOv2 hub code (no weights): {repo}")
    except Exception as exc:  # network, auth, disk: one readable line for the operator
        print(f"prefetch failed: {exc}", file=sys.stderr)
        return 1
    print("Copy this directory to the robot unchanged, then set these node parameters:")
    print("  backend: mapanything")
    print(f"  mapanything.cache_dir: {cache_dir}")
    print(f"  mapanything.model_id: {args.model_id}")
    print(f"  (or mapanything.model_path: {snapshot}, with mapanything.cache_dir still set for the DINOv2 code)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
