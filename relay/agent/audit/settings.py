"""The agent's `audit:` config section: rotation, and an optional syslog copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from relay.agent.audit.events import MAX_LINE_BYTES
from relay.agent.audit.files import DEFAULT_MAX_DEVICES
from relay.agent.audit.trail import DEFAULT_KEEP, DEFAULT_MAX_BYTES

MAX_DEVICE_SETS: Final = 4096
"""The most `audit.max_devices` may be. A hospital's radiologist workstations are tens
to hundreds; each set is listed by every audit page (a few numbers a set in memory, one
stat) and may fill max_size x (keep + 1) on disk (4,097 x 110 MiB, ~440 GiB, at the
defaults): more than this is a typo or no longer one relay's site."""

if TYPE_CHECKING:
    from relay.ops.config import Address, Reader


@dataclass(frozen=True)
class SyslogSettings:
    """Where a copy of each event goes as RFC 5424 syslog over TLS (RFC 5425)."""

    address: Address
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    queue: int = 1000


@dataclass(frozen=True)
class AuditSettings:
    """The agent's `audit:` config section (all optional)."""

    #: each set (the security set, and each device's) rotates at this size
    max_bytes: int = DEFAULT_MAX_BYTES
    #: rotated files each set keeps
    keep: int = DEFAULT_KEEP
    #: device sets kept: on disk at most (max_devices + 1) x max_bytes x (keep + 1)
    max_devices: int = DEFAULT_MAX_DEVICES
    syslog: SyslogSettings | None = None


def read_audit_settings(r: Reader) -> AuditSettings:
    """Read the `audit:` section of an agent config (for relay.agent.config to call).

    ```yaml
    audit:
      max_size: 10MiB        # rotate each set (audit.jsonl, each device's) at this size
      keep: 10               # rotated files each set keeps
      max_devices: 256       # device sets (audit-devices/); a new one beyond prunes the idlest
      syslog:                # optional: also send RFC 5424 over TLS
        address: siem.hospital.local:6514
        ca: siem-ca.crt
        cert: agent-syslog.crt   # optional client certificate
        key: agent-syslog.key
        queue: 1000              # events buffered while the collector is away
    ```
    """
    s = r.optional_section("audit")
    if s is None:
        return AuditSettings()

    def max_size(value: object) -> int:
        from relay.ops.config import parse_size

        size = parse_size(value)
        if not MAX_LINE_BYTES <= size <= 1 << 40:
            raise ValueError(f"expected a size of at least {MAX_LINE_BYTES} bytes, got {size}")
        return size

    settings_max = s.get("max_size", max_size, DEFAULT_MAX_BYTES)
    keep = s.integer("keep", DEFAULT_KEEP, lo=1, hi=1000)
    max_devices = s.integer("max_devices", DEFAULT_MAX_DEVICES, lo=1, hi=MAX_DEVICE_SETS)
    syslog = None
    sys_section = s.optional_section("syslog")
    if sys_section is not None:
        cert = sys_section.existing_file("cert") if sys_section.has("cert") else None
        key = sys_section.existing_file("key") if sys_section.has("key") else None
        if (cert is None) != (key is None):
            raise sys_section.error("cert" if cert is None else "key", "cert and key go together")
        syslog = SyslogSettings(
            address=sys_section.address("address"),
            ca=sys_section.existing_file("ca"),
            cert=cert,
            key=key,
            queue=sys_section.integer("queue", 1000, lo=1, hi=1_000_000),
        )
    return AuditSettings(max_bytes=settings_max, keep=keep, max_devices=max_devices, syslog=syslog)
