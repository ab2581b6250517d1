"""The agent's revocation notices (relay.trust.notice), signed on demand and cached.

Why sign lazily with a cache rather than once at revoke time and store the notice: a
device is revoked by several writers (`relay device revoke` in another process, which
has no business loading the CA key; the IT pages; the directory re-check), and rows
revoked before notices existed have none; signing where the notices are sent covers them
all with one code path, and the registry schema stays as it is. A notice depends only on
the device's id and its revocation time, so a cached one stays valid for as long as the
row does; a device revoked at another time (a new registry) is another key.

Cost: one ECDSA signature, about 50 µs. Incremental pushes sign the few devices revoked
since the last poll on the event loop; a full list (every new gateway link) is built in a
worker thread (relay.agent.linktrust), so a site with many revoked devices signs them
there once per agent process, not on the loop. The cache is bounded at MAX_REVOKED (what
one list may carry), least recently used out first: about 250 bytes per entry, ~25 MB
at the bound. Thread-safe: the worker thread and the loop share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec

from relay.trust.notice import sign_notice
from relay.trust.revocation import MAX_REVOKED

__all__ = ["NoticeSigner"]


class NoticeSigner:
    """Notices of revoked devices, signed with the site CA key, cached by (id, time)."""

    def __init__(self, ca_key: ec.EllipticCurvePrivateKey, max_entries: int = MAX_REVOKED) -> None:
        self.ca_key = ca_key
        self.max_entries = max_entries
        self.signed = 0  # signatures made (the cache's misses)
        self._cache: OrderedDict[tuple[str, datetime], str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cache)

    def notice(self, uri: str, revoked_at: datetime) -> str:
        key = (uri, revoked_at)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        notice = sign_notice(self.ca_key, uri, revoked_at)  # outside the lock: the slow part
        with self._lock:
            self.signed += 1
            self._cache[key] = notice
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return notice

    def notices(self, revocations: dict[str, datetime]) -> dict[str, str]:
        """id -> notice for every (id, revocation time) given."""
        return {uri: self.notice(uri, at) for uri, at in revocations.items()}
