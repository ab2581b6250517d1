"""`dicomweb.viewer` and `dicomweb.viewer_dir`: defaults, relative paths, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.ops.config import ConfigError, Reader
from relay.workstation.dicomweb.settings import read_dicomweb
from relay.workstation.viewer.install import default_viewer_dir
from relay.workstation.viewer.settings import ViewerConfig, viewer_config


def read(data: dict[str, object], tmp_path: Path) -> ViewerConfig:
    r = Reader.document({"dicomweb": {"listen": "127.0.0.1:0", **data}}, tmp_path / "ws.yaml")
    config = read_dicomweb(r)
    r.done()  # viewer_dir is a known key of the section
    assert config is not None
    return viewer_config(config)


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


def test_progressive_is_off_unless_turned_on(tmp_path: Path) -> None:
    assert not read({}, tmp_path).progressive
    assert read({"progressive": True}, tmp_path).progressive
    with pytest.raises(ConfigError, match=r"dicomweb\.progressive"):
        read({"progressive": "sometimes"}, tmp_path)
