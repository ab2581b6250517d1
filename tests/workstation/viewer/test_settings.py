"""`dicomweb.viewer` and `dicomweb.viewer_dir`: defaults, relative paths, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.ops.config import ConfigError, Reader
from relay.workstation.viewer.install import default_viewer_dir
from relay.workstation.viewer.settings import ViewerConfig, read_viewer


def read(data: object, tmp_path: Path) -> ViewerConfig:
    r = Reader.document({"dicomweb": data}, tmp_path / "ws.yaml")
    config = read_viewer(r.section("dicomweb"))
    r.done()
    return config


def test_defaults_serve_the_installed_viewer(tmp_path: Path) -> None:
    config = read({}, tmp_path)
    assert config.enabled and config.dist == default_viewer_dir()


def test_viewer_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = read({"viewer": False, "viewer_dir": "ohif"}, tmp_path)
    assert not config.enabled and config.dist == tmp_path / "ohif"


@pytest.mark.parametrize(
    ("data", "key"), [({"viewer": "yes please"}, "viewer"), ({"viewer_dir": 3}, "viewer_dir")]
)
def test_bad_values_name_the_key(tmp_path: Path, data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"dicomweb.{key}"):
        read(data, tmp_path)
