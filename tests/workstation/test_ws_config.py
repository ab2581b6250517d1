"""One config file, one state directory and one cache key, whichever spelling of its path
a command is given: Windows and macOS compare names without case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from relay.ops.config import Address
from relay.workstation import config as wsconfig
from relay.workstation.config import WorkstationConfig, default_state_dir


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setattr(wsconfig, "user_data_dir", lambda: data)
    return data


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_two_spellings_of_the_config_path_share_the_state_dir(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert default_state_dir(tmp_path / "Site.yaml") == default_state_dir(tmp_path / "site.yaml")
    assert default_state_dir(tmp_path / "Site.yaml") != default_state_dir(tmp_path / "b.yaml")


def test_linux_names_are_case_sensitive(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert default_state_dir(tmp_path / "Site.yaml") != default_state_dir(tmp_path / "site.yaml")


def test_a_macos_state_dir_from_before_is_kept(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade neither orphans the cache nor loses the running workstation."""
    config = tmp_path / "Site.yaml"
    monkeypatch.setattr(sys, "platform", "linux")  # the digest as macOS made it before
    before = default_state_dir(config)
    monkeypatch.setattr(sys, "platform", "darwin")
    folded = default_state_dir(config)
    assert folded != before
    before.mkdir(parents=True)
    assert default_state_dir(config) == before
    folded.mkdir(parents=True)  # once the folded one exists, it is the one
    assert default_state_dir(config) == folded


def _config(path: Path, state_dir: Path | None) -> WorkstationConfig:
    return WorkstationConfig(
        path=path, gateway=Address("127.0.0.1", 1), identity_dir=path.parent,
        metrics_listen=None, dicom=None, state_dir=state_dir,
    )  # fmt: skip


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_the_keyring_account_follows_the_state_dir_not_the_spelling(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    """A start under another spelling made a new key, and the cache was wiped."""
    monkeypatch.setattr(sys, "platform", platform)
    one, two = tmp_path / "Site.yaml", tmp_path / "SITE.YAML"
    a = _config(one, default_state_dir(one)).keyring_account("urn:dev:ws1")
    b = _config(two, default_state_dir(two)).keyring_account("urn:dev:ws1")
    assert a == b and a.startswith("urn:dev:ws1 ")
    assert _config(one, tmp_path / "Other").keyring_account("urn:dev:ws1") != a
    assert _config(one, None).keyring_account("urn:dev:ws1") != a  # embedded: by the path
    assert _config(one, None).legacy_keyring_account("urn:dev:ws1") == f"urn:dev:ws1 {one}"
