"""The device identity a workstation starts with, checked as a reload checks it.

A workstation that starts with a certificate of another CA, another role, or one that
has expired would dial forever and be refused each time, while the gateway alone logs
why. So start-up refuses it (a ConfigError naming `identity_dir`, exit 2). An expired
certificate gets its own line: it cannot renew any more (renewal rides a link the
gateway refuses), only a new enrollment helps. A certificate merely close to its end
starts: the running workstation renews it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from relay.net.tls import TlsConfigError, client_context
from relay.ops import privatefiles
from relay.ops.config import ConfigError
from relay.ops.reloading import check_configured_certificate
from relay.trust.identity import Identity
from relay.trust.pki import PkiError, load_cert
from relay.wire import ALPN_DEVICE
from relay.workstation.config import WorkstationConfig

__all__ = [
    "EXPIRED_MESSAGE",
    "check_identity",
    "check_reloaded_identity",
    "expired_message",
    "not_after",
]

#: An expired device certificate, at start or when the gateway refuses it while running.
EXPIRED_MESSAGE = "device certificate expired at {at}; enroll again: relay enroll CODE --dir {dir}"


def not_after(cert: Path) -> datetime | None:
    """When `cert` expires; None if it cannot be read (the caller reports that)."""
    try:
        return load_cert(cert).not_valid_after_utc
    except PkiError:
        return None


def expired_message(identity_dir: Path, end: datetime | None, now: datetime) -> str | None:
    """EXPIRED_MESSAGE if the certificate that ends at `end` has ended `now`, else None."""
    if end is None or now < end:
        return None
    return EXPIRED_MESSAGE.format(at=end.isoformat(), dir=identity_dir)


def check_identity(config: WorkstationConfig, *, now: datetime | None = None) -> Identity:
    """The device identity in `identity_dir`, checked before the workstation uses it.

    Raises PrivateFileError for a key others may read (its line says what to run), or
    ConfigError naming `identity_dir`: expired, not a device certificate, not signed by
    the `ca.crt` beside it, or a key that does not match.
    """
    files = config.identity_files()
    privatefiles.check_private(files.key, "device key")
    expired = expired_message(config.identity_dir, not_after(files.cert), now or datetime.now(UTC))
    if expired is not None:
        raise ConfigError(config.path, "identity_dir", expired)
    identity = check_configured_certificate(
        config.path, "identity_dir", files.cert, files.ca, role="device"
    )
    try:
        client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE)
    except TlsConfigError as exc:
        raise ConfigError(config.path, "identity_dir", str(exc)) from None
    return identity


def check_reloaded_identity(config: WorkstationConfig, running: Identity) -> None:
    """The identity files a reload is about to present, checked as at start-up and failing
    as start-up fails (a ConfigError naming the config file and `identity_dir`, or a
    PrivateFileError), and still the `running` device: a reload may renew the
    certificate, not change which device this is (restart for that)."""
    files = config.identity_files()
    privatefiles.check_private(files.key, "device key")
    check_configured_certificate(
        config.path,
        "identity_dir",
        files.cert,
        files.ca,
        role="device",
        site=running.site,
        name=running.name,
        reloading=True,
    )
    try:
        client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE)
    except TlsConfigError as exc:
        raise ConfigError(config.path, "identity_dir", str(exc)) from None
