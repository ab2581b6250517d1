"""`cache.key: keyring`: the key survives a restart in the OS store, never beside the cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backend import KeyringBackend

from relay.workstation.cache.keys import KEYRING_SERVICE, forget_master_key, load_master_key


class MemoryKeyring(KeyringBackend):
    """The OS credential store's interface, in memory (CI has no desktop session)."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.items.pop((service, username), None)


@pytest.fixture
def store() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_memory_keys_are_new_each_time() -> None:
    a, fresh_a = load_master_key("memory", "x")
    b, _ = load_master_key("memory", "x")
    assert fresh_a and a != b and len(a) == 32


def test_a_keyring_key_is_kept_and_forgotten_on_revocation(
    store: MemoryKeyring, tmp_path: Path
) -> None:
    first, fresh = load_master_key("keyring", "ws1 /cfg")
    again, fresh_again = load_master_key("keyring", "ws1 /cfg")
    assert fresh and not fresh_again and first == again
    assert (KEYRING_SERVICE, "ws1 /cfg") in store.items
    assert not any(first in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    forget_master_key("keyring", "ws1 /cfg")
    assert store.items == {}
    assert load_master_key("keyring", "ws1 /cfg")[0] != first
