"""The cache at start-up: a directory or key store it cannot use is a config error (exit 2)
naming the config file and the key the user wrote (`cache.dir`, `cache.key`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keyring
import keyring.errors
import pytest
from keyring.backend import KeyringBackend

from relay.ops.config import Address, ConfigError
from relay.workstation.cache.settings import CacheConfig
from relay.workstation.config import DicomNodeConfig
from relay.workstation.service import Workstation, workstation_cache
from tests.ends_helpers import device_identity_dir, workstation_config
from tests.pki_helpers import make_pki


class BrokenKeyring(KeyringBackend):
    """An OS credential store that refuses every call (a locked session, say)."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("the keyring is locked")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.KeyringLocked("the keyring is locked")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.KeyringLocked("the keyring is locked")


def _workstation(tmp_path: Path, cache: CacheConfig) -> Workstation:
    """A workstation (not started) whose DICOM node is on, so the cache is opened."""
    identity = device_identity_dir(make_pki(tmp_path / "pki"), tmp_path)
    config = dataclasses.replace(
        workstation_config(identity, tmp_path, 1),
        dicom=DicomNodeConfig(listen=Address("127.0.0.1", 0)),
        cache=cache,
    )
    return Workstation(config)


async def test_a_cache_dir_that_is_a_file_names_cache_dir_and_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be\n")
    ws = _workstation(tmp_path, CacheConfig(dir=blocker))
    with pytest.raises(ConfigError) as info:
        async with workstation_cache(ws):
            pass
    err = info.value
    assert err.file == ws.config.path
    assert err.key == "cache.dir"
    assert str(err).startswith(f"{ws.config.path}: cache.dir: cannot use {blocker}: ")


async def test_a_keyring_that_refuses_names_cache_key(tmp_path: Path) -> None:
    ws = _workstation(tmp_path, CacheConfig(dir=tmp_path / "cache", key="keyring"))
    previous = keyring.get_keyring()
    keyring.set_keyring(BrokenKeyring())
    try:
        with pytest.raises(ConfigError) as info:
            async with workstation_cache(ws):
                pass
    finally:
        keyring.set_keyring(previous)
    assert info.value.key == "cache.key"
    assert str(info.value) == (
        f"{ws.config.path}: cache.key: keyring: KeyringLocked: the keyring is locked"
    )
    assert not (tmp_path / "cache").exists()  # refused before anything is written


async def test_a_cache_dir_that_refuses_writes_names_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only directory that exists (mkdir accepts it): refused at start, not one
    failed write per study later. (The refusal is simulated: tests may run as root.)"""
    directory = tmp_path / "cache"
    (directory / "objects").mkdir(parents=True)
    real = Path.write_bytes

    def read_only(path: Path, data: bytes) -> int:
        if path.is_relative_to(directory):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    ws = _workstation(tmp_path, CacheConfig(dir=directory))
    with pytest.raises(ConfigError) as info:
        async with workstation_cache(ws):
            pass
    assert info.value.key == "cache.dir"
    assert str(info.value).startswith(
        f"{ws.config.path}: cache.dir: cannot use {directory}: Permission denied"
    )
