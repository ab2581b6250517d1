"""`cache.key: keyring`: the key survives a restart in the OS store, never beside the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.workstation.cache.keys import (
    KEYRING_SERVICE,
    KeyUnavailable,
    forget_master_key,
    load_master_key,
)
from tests.workstation.cache.conftest import MemoryKeyring


def test_memory_keys_are_new_each_time() -> None:
    a, fresh_a = load_master_key("memory", "x")
    b, _ = load_master_key("memory", "x")
    assert fresh_a and a != b and len(a) == 32


def test_a_keyring_key_is_kept_and_forgotten_on_revocation(
    memory_keyring: MemoryKeyring, tmp_path: Path
) -> None:
    first, fresh = load_master_key("keyring", "ws1 /cfg")
    again, fresh_again = load_master_key("keyring", "ws1 /cfg")
    assert fresh and not fresh_again and first == again
    assert (KEYRING_SERVICE, "ws1 /cfg") in memory_keyring.items
    assert not any(first in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    forget_master_key("keyring", "ws1 /cfg")
    assert memory_keyring.items == {}
    assert load_master_key("keyring", "ws1 /cfg")[0] != first


def test_a_key_under_the_old_account_is_moved_not_replaced(memory_keyring: MemoryKeyring) -> None:
    """The account was the config path as spelled; a new key would wipe the cache."""
    old, _ = load_master_key("keyring", "ws1 C:\\Users\\Ana\\Site.yaml")
    key, fresh = load_master_key("keyring", "ws1 c:\\state", "ws1 C:\\Users\\Ana\\Site.yaml")
    assert key == old and not fresh
    assert set(memory_keyring.items) == {(KEYRING_SERVICE, "ws1 c:\\state")}
    again, fresh = load_master_key("keyring", "ws1 c:\\state", "ws1 C:\\Users\\Ana\\Site.yaml")
    assert again == old and not fresh


class error(Exception):  # pywin32's pywintypes.error, by its name
    """What keyring's Windows backend lets through when Credential Manager refuses: not a
    KeyringError (win32ctypes.pywintypes.error: winerror, funcname, strerror)."""


@pytest.mark.parametrize("refused", ["get_password", "set_password"])
def test_a_windows_credential_manager_refusal_is_a_one_line_key_error(
    memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """It escaped load_master_key, and the workstation's start ended in a traceback
    instead of `cache.key: keyring: ...`."""

    def refuse(*args: object) -> None:
        raise error(1312, "CredWrite", "A specified logon session does not exist.")

    monkeypatch.setattr(memory_keyring, refused, refuse)
    with pytest.raises(KeyUnavailable) as info:
        load_master_key("keyring", "ws1 c:\\state")
    assert str(info.value) == (
        "keyring: error: (1312, 'CredWrite', 'A specified logon session does not exist.')"
    )
    assert memory_keyring.items == {}
