"""``mapany-ros prefetch``: argument parsing and what it downloads, with the downloaders faked."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from mapany_ros.commands import prefetch


@pytest.fixture
def fake_downloads(monkeypatch, request):
    """Fake snapshot_download / torch.hub.list that write what the real ones would."""
    seen: dict[str, object] = {}

    def snapshot_download(repo_id, cache_dir=None, allow_patterns=None, force_download=False, **kwargs):
        seen["snapshot"] = dict(
            repo_id=repo_id, cache_dir=cache_dir, allow_patterns=allow_patterns, force_download=force_download
        )
        snap = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc"
        snap.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            (snap / name).write_text("x")
        return str(snap)

    def hub_list(github, force_reload=False, trust_repo=None, **kwargs):
        seen["hub"] = dict(
            github=github, force_reload=force_reload, trust_repo=trust_repo, dir=torch.hub.get_dir()
        )
        repo = Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"
        repo.mkdir(parents=True, exist_ok=True)
        (repo / "hubconf.py").write_text("dependencies = []\n")
        return ["dinov2_vits14"]

    def no_weights(*args, **kwargs):
        raise AssertionError("prefetch must not load models or weights")

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    monkeypatch.setattr(torch.hub, "list", hub_list)
    monkeypatch.setattr(torch.hub, "load", no_weights)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_weights)
    old_hub = torch.hub.get_dir()
    request.addfinalizer(lambda: torch.hub.set_dir(old_hub))
    return seen


def test_parser_defaults_and_required_cache_dir(capsys):
    args = prefetch.build_parser().parse_args(["--cache-dir", "/tmp/x"])
    assert (
        args.cache_dir == Path("/tmp/x")
        and args.model_id == "facebook/map-anything-apache"
        and not args.force
    )
    args = prefetch.build_parser().parse_args(
        ["--cache-dir", "d", "--model-id", "facebook/map-anything", "--force"]
    )
    assert args.model_id == "facebook/map-anything" and args.force
    with pytest.raises(SystemExit):
        prefetch.build_parser().parse_args([])
    assert "--cache-dir" in capsys.readouterr().err


def test_prefetch_fills_the_layout_the_backend_reads(tmp_path, fake_downloads, capsys):
    cache = tmp_path / "cache"
    assert prefetch.main(["--cache-dir", str(cache), "--model-id", "org/model"]) == 0
    snap = fake_downloads["snapshot"]
    assert snap["repo_id"] == "org/model" and snap["cache_dir"] == str(cache / "huggingface")
    assert snap["allow_patterns"] == ["config.json", "model.safetensors"]
    hub = fake_downloads["hub"]
    assert hub["github"] == "facebookresearch/dinov2:main" and hub["dir"] == str(cache / "torch" / "hub")
    assert (cache / "torch" / "hub" / "facebookresearch_dinov2_main" / "hubconf.py").is_file()
    out = capsys.readouterr().out
    assert f"cache_dir: {cache}" in out and "model_id: org/model" in out and "backend: mapanything" in out


def test_prefetch_reports_failures_with_exit_code(tmp_path, fake_downloads, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    assert prefetch.main(["--cache-dir", str(tmp_path)]) == 1
    assert "no route to host" in capsys.readouterr().err


def test_console_command_dispatches_to_prefetch(tmp_path, fake_downloads, capsys):
    from mapany_ros.commands import cli

    assert cli.main(["prefetch", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "mapanything.cache_dir" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
