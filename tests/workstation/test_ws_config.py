"""One config file, one state directory and one cache key, whichever spelling of its path
a command is given: Windows and macOS compare names without case."""

from __future__ import annotations

import os
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


NFC_NAME, NFD_NAME = "Caf\u00e9.yaml", "Cafe\u0301.yaml"  # typed; as HFS+ lists it


@pytest.mark.parametrize("platform", ["darwin", "win32", "linux"])
def test_path_keys_follow_each_platforms_file_system(tmp_path: Path, platform: str) -> None:
    """Runs everywhere: each flavour is a parameter, not the machine's own."""

    def key(name: str) -> str:
        return wsconfig.path_key(tmp_path / name, platform)

    def same(a: str, b: str) -> bool:
        return key(a) == key(b)

    insensitive = platform != "linux"
    assert same("Site.yaml", "SITE.yaml") is insensitive
    # APFS/HFS+ compare names normalised; NTFS and ext4 keep NFC and NFD apart
    assert same(NFC_NAME, NFD_NAME) is (platform == "darwin")
    assert same("CAF\u00c9.yaml", NFD_NAME) is (platform == "darwin")
    if platform != "darwin":  # (macOS keeps str.casefold(), as before)
        # NTFS upcases one character to one: sharp s is not "ss" there, nor ẞ
        assert not same("Stra\u00dfe.yaml", "STRASSE.yaml")
        assert same("stra\u00dfe.yaml", "STRA\u00dfE.yaml") is insensitive
        assert not same("\u00dfite.yaml", "\u1e9eite.yaml")
        assert not same("\u212a.yaml", "k.yaml")  # the Kelvin sign upcases to itself
        assert same("\u0131.yaml", "I.yaml") is insensitive  # dotless i upcases to I
    assert not same("Site.yaml", "Other.yaml")


def test_windows_keys_of_plain_names_are_what_they_were(tmp_path: Path) -> None:
    """A state directory's digest comes from the key: it must not move for names that
    were folded right before (lowercase; accented letters too)."""
    for name in ("Site.YAML", "J\u00fcrgen/Ana.yaml", "\u00c9COLE.yaml"):
        spelled = os.path.abspath(tmp_path / name)
        assert wsconfig.path_key(tmp_path / name, "win32") == spelled.casefold()


@pytest.mark.parametrize(
    ("platform", "before", "now"),
    [
        ("win32", "stra\u00dfe.yaml", "Stra\u00dfe.yaml"),  # was folded to strasse
        ("darwin", NFD_NAME, NFD_NAME),  # was casefolded without normalising
    ],
)
def test_a_state_dir_under_the_previous_key_is_kept(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str,
    *, before: str, now: str,
) -> None:  # fmt: skip
    """An upgrade keeps the cache and the revocation marker of a path whose key changed."""
    monkeypatch.setattr(sys, "platform", platform)
    config = tmp_path / now
    current = default_state_dir(config)
    previous = (
        data_dir
        / "workstation"
        / wsconfig._state_dir_name(os.path.abspath(tmp_path / before).casefold())
    )
    assert previous != current
    previous.mkdir(parents=True)
    assert default_state_dir(config) == previous
    current.mkdir(parents=True)  # once the current one exists, it is the one
    assert default_state_dir(config) == current
