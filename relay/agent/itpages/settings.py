"""The agent config's `it_pages:` section: where the IT pages listen, how IT logs in.

```yaml
it_pages:
  listen: 127.0.0.1:9180          # the agent's internal side; never the gateway
  tls: {cert: it.crt, key: it.key}  # required unless listen is a loopback address
  admins_file: it-admins          # scrypt hashes (`relay it-admin passwd`); only
                                  # without directory: (then the admin group decides)
  enroll_gateway: relay.hospital.example:443  # what new codes tell PCs to dial
  session_idle: 15m
  session_max: 8h
  max_sessions: 64
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.ops.config import Address, Reader, parse_address

__all__ = ["ItPagesSettings", "read_it_pages_settings"]

DEFAULT_IDLE: Final = 15 * 60.0
DEFAULT_MAX_AGE: Final = 8 * 3600.0


@dataclass(frozen=True)
class ItPagesSettings:
    """Where and how the IT pages are served. Durations in seconds."""

    listen: Address
    cert: Path | None = None  # both or neither: HTTPS
    key: Path | None = None
    admins_file: Path | None = None  # None: the directory's admin group
    enroll_gateway: Address | None = None  # None: the agent's first `gateways` entry
    session_idle: float = DEFAULT_IDLE
    session_max: float = DEFAULT_MAX_AGE
    max_sessions: int = 64

    @property
    def tls(self) -> bool:
        return self.cert is not None


def read_it_pages_settings(
    r: Reader, *, has_directory: bool, has_pki: bool
) -> ItPagesSettings | None:
    """`it_pages:` of the agent config, or None when absent.

    Strict: no `pki:` (the pages issue codes), plain HTTP on a non-loopback address (the
    session cookie would cross the network in clear), both or neither of a directory and
    an admins file (exactly one says who is IT) are each a ConfigError naming the key.
    """
    s = r.optional_section("it_pages")
    if s is None:
        return None
    if not has_pki:
        raise r.error("it_pages", "needs pki: (the IT pages create enrollment codes)")
    listen = s.address("listen", listen=True)
    cert = key = None
    if s.has("tls"):
        t = s.section("tls")
        cert, key = t.existing_file("cert"), t.existing_file("key")
    else:
        s.raw("tls")
        if not listen.is_loopback:
            raise s.error(
                "tls",
                f"required when listen ({listen}) is not a loopback address: the session "
                "cookie and passwords must not cross the network in clear",
            )
    admins_file: Path | None = None
    if s.has("admins_file"):
        if has_directory:
            raise s.error(
                "admins_file",
                "not with directory: (IT logs in with the directory's admin_group then)",
            )
        admins_file = s.path("admins_file")
    else:
        s.raw("admins_file")
        if not has_directory:
            raise s.error(
                "admins_file",
                "required without directory: (create it with `relay it-admin passwd`)",
            )
    gateway = s.get("enroll_gateway", lambda v: parse_address(str(v)), None)
    idle = s.duration("session_idle", DEFAULT_IDLE, lo=10.0, hi=86400.0)
    max_age = s.duration("session_max", DEFAULT_MAX_AGE, lo=10.0, hi=7 * 86400.0)
    if idle > max_age:
        raise s.error("session_idle", "must not be longer than session_max")
    return ItPagesSettings(
        listen=listen,
        cert=cert,
        key=key,
        admins_file=admins_file,
        enroll_gateway=gateway,
        session_idle=idle,
        session_max=max_age,
        max_sessions=s.integer("max_sessions", 64, lo=1, hi=10_000),
    )
