"""The agent config's `directory:` section, typed and checked at load time.

    directory:
      url: ldaps://dc1.hospital.local          # or ldap://... with start_tls: true
      start_tls: false
      ca: certs/directory-ca.pem               # absent: the system's CAs
      bind_dn: cn=relay,ou=services,dc=hospital,dc=local
      bind_password_file: secrets/directory.pw # first line is the password
      user_base: ou=people,dc=hospital,dc=local
      user_filter: (uid={user})                # AD: (sAMAccountName={user})
      group: cn=radiologists,ou=groups,dc=hospital,dc=local
      admin_group: cn=relay-it,ou=groups,dc=hospital,dc=local
      member_attribute: member                 # AD nested: member:1.2.840.113556.1.4.1941:
      disabled_filter: (pwdAccountLockedTime=*) # AD: (userAccountControl:1.2.840.113556.1.4.803:=2)
      recheck_interval: 15m
      timeout: 10s
      max_connections: 4
      max_revocations_per_check: 10

Plain `ldap://` without StartTLS would send every password in the clear: refused unless
`insecure_plaintext: true` (for a lab; never needed by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from relay.agent.directory.filters import check_filter
from relay.ops.config import Reader, check_host

__all__ = ["DirectorySettings", "read_directory_settings"]

MAX_PASSWORD_FILE: Final = 4096
DEFAULT_RECHECK: Final = 900.0
DEFAULT_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class DirectorySettings:
    """Where the directory is and how to ask it; durations are seconds."""

    host: str
    port: int
    use_ssl: bool  # ldaps://
    start_tls: bool
    ca: Path | None
    bind_dn: str
    bind_password: str
    user_base: str
    user_filter: str
    group: str
    admin_group: str | None = None
    member_attribute: str = "member"
    disabled_filter: str | None = None
    recheck_interval: float = DEFAULT_RECHECK
    timeout: float = DEFAULT_TIMEOUT
    max_connections: int = 4
    max_revocations_per_check: int = 10
    insecure_plaintext: bool = False

    @property
    def url(self) -> str:
        scheme = "ldaps" if self.use_ssl else "ldap"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def encrypted(self) -> bool:
        return self.use_ssl or self.start_tls


def _parse_url(value: object) -> tuple[str, int, bool]:
    if not isinstance(value, str):
        raise ValueError(f"expected an ldaps:// or ldap:// URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("ldap", "ldaps"):
        raise ValueError(f"expected an ldaps:// or ldap:// URL, got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"expected scheme://host[:port] only, got {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    host = check_host(parts.hostname or "")
    use_ssl = parts.scheme == "ldaps"
    return host, port or (636 if use_ssl else 389), use_ssl


def _dn(value: object) -> str:
    if not isinstance(value, str) or "=" not in value or len(value) > 1024:
        raise ValueError(f"expected a DN like cn=x,dc=example,dc=org, got {value!r}")
    if any(not c.isprintable() for c in value):
        raise ValueError("the DN holds control characters")
    return value


def _attribute(value: object) -> str:
    # An attribute type, optionally with an extensible-match rule (AD's transitive
    # membership: member:1.2.840.113556.1.4.1941:).
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(f"expected an attribute name, got {value!r}")
    if any(not (c.isalnum() or c in "-.:;") for c in value):
        raise ValueError(f"expected an attribute name, got {value!r}")
    return value


def _read_password(r: Reader, name: str) -> str:
    path = r.existing_file(name)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        raise r.error(name, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise r.error(name, f"{path} is longer than {MAX_PASSWORD_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise r.error(name, f"{path} is not UTF-8") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise r.error(name, f"{path} is empty (its first line is the password)")
    return password


def read_directory_settings(r: Reader) -> DirectorySettings | None:
    """`directory:` of the agent config, or None when absent."""
    s = r.optional_section("directory")
    if s is None:
        return None
    host, port, use_ssl = s.get("url", _parse_url)
    start_tls = s.boolean("start_tls", False)
    insecure = s.boolean("insecure_plaintext", False)
    if use_ssl and start_tls:
        raise s.error("start_tls", "ldaps:// is TLS already; StartTLS is for ldap:// URLs")
    if not use_ssl and not start_tls and not insecure:
        raise s.error(
            "url",
            "ldap:// without StartTLS sends passwords in the clear: use ldaps://, or set "
            "start_tls: true",
        )
    ca = s.existing_file("ca") if s.has("ca") else None
    if not s.has("ca"):
        s.raw("ca")
    settings = DirectorySettings(
        host=host,
        port=port,
        use_ssl=use_ssl,
        start_tls=start_tls,
        ca=ca,
        bind_dn=s.get("bind_dn", _dn),
        bind_password=_read_password(s, "bind_password_file"),
        user_base=s.get("user_base", _dn),
        user_filter=s.text(
            "user_filter", "(uid={user})", check=lambda v: check_filter(str(v), placeholder=True)
        ),
        group=s.get("group", _dn),
        admin_group=s.get("admin_group", _dn, None),
        member_attribute=s.get("member_attribute", _attribute, "member"),
        disabled_filter=s.get(
            "disabled_filter",
            lambda v: check_filter(str(v), placeholder=False),
            None,
        ),
        recheck_interval=s.duration("recheck_interval", DEFAULT_RECHECK, lo=1.0, hi=7 * 86400.0),
        timeout=s.duration("timeout", DEFAULT_TIMEOUT, lo=0.1, hi=120.0),
        max_connections=s.integer("max_connections", 4, lo=1, hi=64),
        max_revocations_per_check=s.integer("max_revocations_per_check", 10, lo=1, hi=100_000),
        insecure_plaintext=insecure,
    )
    return settings
