"""The agent's configuration file, typed and validated at load time."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import cast

from relay.agent.audit import AuditSettings, read_audit_settings
from relay.agent.directory.settings import DirectorySettings, read_directory_settings
from relay.agent.itpages.settings import ItPagesSettings, read_it_pages_settings
from relay.dicom.pacs_target import (
    MAX_CODEC_WORKERS,
    MAX_PACS_TIMEOUT,
    MAX_SPARE_ASSOCIATION,
    PIXEL_CODEC_CHOICES,
    RETRIEVE_CHOICES,
    PacsTarget,
    PixelCodecs,
    Retrieve,
)
from relay.ops.config import (
    DEFAULT_LOG_LEVEL,
    RESERVED_SERVICE_NAMES,
    Address,
    Backoff,
    LinkSettings,
    Reader,
    TlsFiles,
    check_ae_title,
    check_host,
    read_backoff,
    read_drain_grace,
    read_limits,
    read_log_level,
    read_tls,
)
from relay.ops.configfile import load_config
from relay.trust.identity import check_name

__all__ = [
    "DEFAULT_DEVICE_LIFETIME",
    "DEFAULT_PACS_OPERATIONS",
    "MAX_PACS_OPERATIONS",
    "AgentConfig",
    "PkiFiles",
    "ServiceConfig",
    "load_agent_config",
    "read_agent_config",
]

# Device certificates issued at enrollment and renewal (DESIGN section 2: short-lived).
DEFAULT_DEVICE_LIFETIME = 30 * 86400.0
# Seconds-long lifetimes exist for tests of renewal; a year is the longest we issue.
MIN_DEVICE_LIFETIME = 1.0
MAX_DEVICE_LIFETIME = 366 * 86400.0


@dataclass(frozen=True)
class ServiceConfig:
    """A TCP service inside the hospital that devices may reach by `name`.

    With `compress`, both ends (agent and workstation) zstd-compress the service's
    streams; the gateway passes bytes on either way.
    """

    name: str
    address: Address
    compress: bool = False


@dataclass(frozen=True)
class PkiFiles:
    """The site CA that signs device certificates (its key never leaves the agent), and
    the lifetime of the certificates it issues (seconds; renewed at two thirds)."""

    ca_cert: Path
    ca_key: Path
    device_lifetime: float = DEFAULT_DEVICE_LIFETIME


# The gateway opens one stream on the agent's link for every device session (and request
# stream) it routes there, so the agent's MAX_STREAMS is the capacity that all devices of
# the site on that gateway share: 4,096 = 2,000 devices with a session each, room for a
# renewal or reconnect each, and the gateway's reserve (per_device.agent_reserve, 64).
# Each idle stream costs the agent a few hundred bytes in the core plus what its handler
# holds. Raise it with the number of devices per gateway.
AGENT_LINK_SETTINGS = LinkSettings(max_streams=4096)

DEFAULT_PACS_OPERATIONS = 64
"""`pacs.max_operations`: DICOM operations (streams served against the PACS, each with its
own association once its request is read) at once, all devices together; more are
refused with LIMIT_EXCEEDED. Keep it below the PACS's association limit for our calling
AE title, less the spare association and, with `retrieve: move`, the PACS's own
associations to our storage SCP. One device gets at most half (relay.agent.dispatch)."""
MAX_PACS_OPERATIONS = 1024  # a thread each: far above what a PACS accepts from one AE
MAX_STREAM_BUCKET = 1_000_000  # per_device.stream_burst and stream_rate: any real need


@dataclass(frozen=True)
class AgentConfig:
    """Everything `relay agent` needs; see config/agent.yaml for the keys.

    `pki` None: the agent neither enrolls nor renews devices. `pacs` None: no DICOM,
    only `services`. `directory` None: devices are not bound to directory users.
    `state_dir` is resolved but not created (the agent creates it). Durations are seconds.
    """

    path: Path
    site: str
    gateways: tuple[Address, ...]
    tls: TlsFiles
    pki: PkiFiles | None
    state_dir: Path
    metrics_listen: Address | None
    pacs: PacsTarget | None
    max_pacs_operations: int = DEFAULT_PACS_OPERATIONS  # YAML `pacs.max_operations`
    # YAML `per_device.stream_burst` / `per_device.stream_rate` (streams a second): each
    # device's bucket of streams served; None: relay.agent.dispatch's defaults (320, 50)
    stream_burst: int | None = None
    stream_rate: int | None = None
    services: Mapping[str, ServiceConfig] = field(default_factory=lambda: MappingProxyType({}))
    limits: LinkSettings = field(default_factory=lambda: AGENT_LINK_SETTINGS)
    reconnect: Backoff = field(default_factory=Backoff)
    resolve_interval: float = 30.0
    compression_level: int = 3
    drain_grace: float = 30.0
    log_level: str = DEFAULT_LOG_LEVEL
    audit: AuditSettings = field(default_factory=AuditSettings)
    directory: DirectorySettings | None = None
    it_pages: ItPagesSettings | None = None


def check_move_sender(value: object) -> str:
    """A `pacs.move_senders` entry: a host name, an address or a network (CIDR)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            ipaddress.ip_network(value.strip(), strict=False)
            return value.strip()
    return check_host(value)


def _read_pacs(r: Reader) -> tuple[PacsTarget | None, int]:
    """The `pacs:` section, and its `max_operations` (the agent's, not the PACS target's)."""
    s = r.optional_section("pacs")
    if s is None:
        return None, DEFAULT_PACS_OPERATIONS
    operations = s.integer("max_operations", DEFAULT_PACS_OPERATIONS, lo=1, hi=MAX_PACS_OPERATIONS)
    target = s.build(
        PacsTarget,
        ae_title=s.text("ae_title", check=check_ae_title),
        host=s.text("host", check=check_host),
        port=s.integer("port", lo=1, hi=65535),
        calling_ae_title=s.text(
            "calling_ae_title", PacsTarget.calling_ae_title, check=check_ae_title
        ),
        retrieve=cast(Retrieve, s.choice("retrieve", RETRIEVE_CHOICES, PacsTarget.retrieve)),
        move_ae_title=s.text("move_ae_title", PacsTarget.move_ae_title, check=check_ae_title),
        move_listen=s.optional_address("move_listen", listen=True),
        move_senders=tuple(s.sequence("move_senders", check_move_sender)),
        move_sender_ae_titles=tuple(s.sequence("move_sender_ae_titles", check_ae_title)),
        timeout=s.duration("timeout", PacsTarget.timeout, hi=MAX_PACS_TIMEOUT, above_lo=True),
        pixel_codecs=cast(
            PixelCodecs, s.choice("pixel_codecs", PIXEL_CODEC_CHOICES, PacsTarget.pixel_codecs)
        ),
        codec_workers=s.integer(
            "codec_workers", PacsTarget.codec_workers, lo=1, hi=MAX_CODEC_WORKERS
        ),
        spare_association=s.duration(
            "spare_association", PacsTarget.spare_association, hi=MAX_SPARE_ASSOCIATION
        ),
    )
    return target, operations


def _read_services(r: Reader) -> Mapping[str, ServiceConfig]:
    s = r.section("services")
    services: dict[str, ServiceConfig] = {}
    for name in s.present_keys():
        try:
            check_name(name, "service name")
        except ValueError as exc:
            raise s.error(name, str(exc)) from None
        if name in RESERVED_SERVICE_NAMES:
            raise s.error(name, f"{name!r} is reserved for the DICOM stream target")
        if isinstance(s.raw(name), dict):
            entry = s.section(name)
            service = ServiceConfig(
                name, entry.address("address"), entry.boolean("compress", ServiceConfig.compress)
            )
        else:
            service = ServiceConfig(name, s.address(name))
        services[name] = service
    return MappingProxyType(services)


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Load and check an agent config file; raises relay.ops.config.ConfigError."""
    return load_config(path, read_agent_config)


def read_agent_config(r: Reader) -> AgentConfig:
    """The agent's schema, applied to a parsed config file."""
    site = r.text("site", check=lambda v: check_name(v, "site name"))
    gateways = r.addresses("gateways", min_len=1)
    tls = read_tls(r)
    pki_section = r.optional_section("pki")
    pki = None
    if pki_section is not None:
        pki = PkiFiles(
            ca_cert=pki_section.existing_file("ca_cert"),
            ca_key=pki_section.existing_file("ca_key"),
            device_lifetime=pki_section.duration(
                "device_lifetime",
                DEFAULT_DEVICE_LIFETIME,
                lo=MIN_DEVICE_LIFETIME,
                hi=MAX_DEVICE_LIFETIME,
            ),
        )
    directory = read_directory_settings(r)
    pacs, max_pacs_operations = _read_pacs(r)
    per_device = r.optional_section("per_device")
    stream_burst = stream_rate = None
    if per_device is not None:
        if "stream_burst" in per_device.present_keys():
            stream_burst = per_device.integer("stream_burst", lo=1, hi=MAX_STREAM_BUCKET)
        if "stream_rate" in per_device.present_keys():
            stream_rate = per_device.integer("stream_rate", lo=1, hi=MAX_STREAM_BUCKET)
    return AgentConfig(
        path=Path(os.path.abspath(r.file)),
        site=site,
        gateways=gateways,
        tls=tls,
        pki=pki,
        state_dir=r.path("state_dir"),
        metrics_listen=r.optional_address("metrics_listen", listen=True),
        pacs=pacs,
        max_pacs_operations=max_pacs_operations,
        stream_burst=stream_burst,
        stream_rate=stream_rate,
        services=_read_services(r),
        limits=read_limits(r, AGENT_LINK_SETTINGS),
        reconnect=read_backoff(r),
        resolve_interval=r.duration(
            "resolve_interval", AgentConfig.resolve_interval, lo=1.0, hi=86400.0
        ),
        compression_level=r.integer(
            "compression_level", AgentConfig.compression_level, lo=1, hi=19
        ),
        drain_grace=read_drain_grace(r, AgentConfig.drain_grace),
        log_level=read_log_level(r),
        audit=read_audit_settings(r),
        directory=directory,
        it_pages=read_it_pages_settings(
            r, has_directory=directory is not None, has_pki=pki is not None
        ),
    )
