"""Encryption of every cache file: AES-GCM, a fresh key per file, the identity bound in.

Why a key per file: the master key may live for days in the OS keyring across restarts,
so a counter nonce could repeat after a restart and random 96-bit nonces need a global
count. Each file instead gets a random 128-bit salt; HKDF(master, salt) gives that file's
own AES-256 key, used once. A repeated (key, nonce) pair would need a salt collision.

The associated data is the object's identity (an instance's Study and SOP Instance UIDs,
relay.workstation.cache.store.instance_id, or "index"), so a file swapped for another
one (another study's too), renamed, truncated or edited fails authentication.
File names are an HMAC of the identity under a subkey: they reveal no UID.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KEY_BYTES", "SealError", "Sealer"]

KEY_BYTES: Final = 32
MAGIC: Final = b"RCv1"
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 12
HEADER_BYTES: Final = len(MAGIC) + SALT_BYTES + NONCE_BYTES
OVERHEAD: Final = HEADER_BYTES + 16  # header and GCM tag


class SealError(ValueError):
    """A file that does not authenticate: tampered, truncated, or sealed under another key."""


class Sealer:
    """Seals and opens cache objects under one master key (never written beside them)."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise ValueError("the cache key must be 32 bytes")
        self._master = master
        self._names = _hkdf(master, b"", b"relay-cache names v1")

    @staticmethod
    def new_key() -> bytes:
        return os.urandom(KEY_BYTES)

    def name(self, identity: str) -> str:
        """The file name of an object: an HMAC of its identity, nothing readable."""
        return hmac.new(self._names, identity.encode(), hashlib.sha256).hexdigest()[:40]

    def seal(self, identity: str, plaintext: bytes) -> bytes:
        salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
        key = _hkdf(self._master, salt, b"relay-cache file v1")
        body = AESGCM(key).encrypt(nonce, plaintext, _aad(identity))
        return MAGIC + salt + nonce + body

    def open(self, identity: str, sealed: bytes) -> bytes:
        if len(sealed) < OVERHEAD or sealed[: len(MAGIC)] != MAGIC:
            raise SealError("not a cache file (short or wrong magic)")
        salt = sealed[len(MAGIC) : len(MAGIC) + SALT_BYTES]
        nonce = sealed[len(MAGIC) + SALT_BYTES : HEADER_BYTES]
        key = _hkdf(self._master, salt, b"relay-cache file v1")
        try:
            return AESGCM(key).decrypt(nonce, sealed[HEADER_BYTES:], _aad(identity))
        except InvalidTag:
            raise SealError("authentication failed (tampered, or another key)") from None


def _aad(identity: str) -> bytes:
    return b"relay-cache v1\x00" + identity.encode()


def _hkdf(master: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt or None, info=info).derive(
        master
    )
