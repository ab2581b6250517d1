"""Where the cache's master key lives: process memory (default) or the OS keyring.

Memory: a restart loses the key, so whatever a previous run left is unreadable and is
wiped at start: the cache is temporary by construction. Keyring (`cache.key: keyring`):
the key survives restarts in the user's OS credential store (Windows Credential Manager,
macOS Keychain, Secret Service), never in a file beside the cache.
"""

from __future__ import annotations

import base64
import logging
from typing import Final, Literal

from relay.workstation.cache.sealing import KEY_BYTES, Sealer

log = logging.getLogger(__name__)

KeyMode = Literal["memory", "keyring"]
KEYRING_SERVICE: Final = "dmz-relay-cache"


class KeyUnavailable(Exception):
    """The configured key store cannot give or keep a key; one line, without the key's
    name (start-up reports it as the config file's `cache.key`)."""


def load_master_key(
    mode: KeyMode, account: str, legacy_account: str | None = None
) -> tuple[bytes, bool]:
    """The master key and whether it is new (a new key: nothing old is readable).

    A key kept under `legacy_account` (an older version's name for the same cache) and
    none under `account` is moved there: a new key would wipe the cache it opens."""
    if mode == "memory":
        return Sealer.new_key(), True
    try:
        import keyring
    except ImportError as exc:  # pragma: no cover - a dependency
        raise KeyUnavailable(f"keyring needs the keyring package ({exc})") from None
    try:
        stored = keyring.get_password(KEYRING_SERVICE, account)
        if not stored and legacy_account is not None and legacy_account != account:
            stored = keyring.get_password(KEYRING_SERVICE, legacy_account)
            if stored:
                keyring.set_password(KEYRING_SERVICE, account, stored)
                keyring.delete_password(KEYRING_SERVICE, legacy_account)
                log.info("the cache key moved to this state directory's keyring entry")
        if stored:
            key = base64.b64decode(stored)
            if len(key) == KEY_BYTES:
                return key, False
            log.error("the cache key in the OS keyring is malformed; starting a new cache")
        key = Sealer.new_key()
        keyring.set_password(KEYRING_SERVICE, account, base64.b64encode(key).decode())
        return key, True
    # Each backend raises its own: keyring's Windows backend lets pywin32's
    # `pywintypes.error` through (CredWrite refused by a policy, no logon session, a name
    # over Credential Manager's limits), not a KeyringError as macOS's and Secret
    # Service's do; a garbled entry's base64 raises ValueError. To the cache they all mean
    # one thing: no key from the store, said in one line.
    except Exception as exc:
        raise KeyUnavailable(f"keyring: {type(exc).__name__}: {exc}") from None


def forget_master_key(mode: KeyMode, account: str) -> None:
    """Drop a keyring key (after a wipe for revocation); nothing to do in memory mode."""
    if mode != "keyring":
        return
    try:
        import keyring
        import keyring.errors

        keyring.delete_password(KEYRING_SERVICE, account)
    except Exception as exc:
        log.warning("could not delete the cache key from the keyring: %s", type(exc).__name__)
