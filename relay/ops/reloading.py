"""SIGHUP: what every role checks before it swaps certificates and settings, and the count.

A reload must never make things worse than not reloading. So the new certificate is
checked before it replaces the running one: it loads with its key (the TLS context
does that), it is signed by a CA of the new bundle, it is valid now, and it names the
identity this process already runs as (a role, site or device change is a different
process, not a reload). Settings that only take effect at start-up (listeners, the PACS,
the state directory...) keep their running values; `keep_restart_only` says which
changed so the caller can log that they need a restart. Results are counted in
`relay_reloads_total{result="ok"|"error"}`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.ops import logs
from relay.ops.config import ConfigError
from relay.trust.identity import Identity, IdentityError, identity_from_certificate
from relay.trust.pki import PkiError, load_certs, trust_domain_of_ca

__all__ = [
    "ReloadCounter",
    "ReloadError",
    "check_configured_certificate",
    "check_own_certificate",
    "keep_restart_only",
    "log_restart_needed",
    "set_log_level",
]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ReloadError(Exception):
    """The new files or settings cannot replace the running ones; the message says why."""


class ReloadCounter(Collector):
    """`relay_reloads_total{result}` of one process; both results exported from zero."""

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0

    def record(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.error += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_reloads", "Configuration reloads (SIGHUP) by result", labels=["result"]
        )
        family.add_metric(["ok"], self.ok)
        family.add_metric(["error"], self.error)
        yield family


def check_own_certificate(
    cert_path: Path,
    ca_path: Path,
    *,
    role: str,
    site: str | None = None,
    name: str | None = None,
    now: datetime | None = None,
    reloading: bool = True,
) -> Identity:
    """The identity of the certificate a reload (or a start) is about to present, checked.

    Raises ReloadError unless the certificate is signed by a CA in `ca_path`, is valid
    `now`, and carries a `role` identity of that CA's trust domain (and of `site` and
    `name` when given). Whether the key matches is for the TLS context to check.
    """
    try:
        cert = load_certs(cert_path)[0]
        cas = load_certs(ca_path)
    except PkiError as exc:
        raise ReloadError(str(exc)) from None
    issuer = next((ca for ca in cas if _issued_by(cert, ca)), None)
    if issuer is None:
        raise ReloadError(f"{cert_path}: not signed by a CA in {ca_path}")
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment < cert.not_valid_after_utc:
        raise ReloadError(
            f"{cert_path}: not valid now (valid {cert.not_valid_before_utc.isoformat()} "
            f"to {cert.not_valid_after_utc.isoformat()})"
        )
    try:
        identity = identity_from_certificate(cert)
        trust_domain = trust_domain_of_ca(issuer)
    except (IdentityError, PkiError) as exc:
        raise ReloadError(f"{cert_path}: {exc}") from None
    wanted = {"trust domain": trust_domain, "role": role}
    if site is not None:
        wanted["site"] = site
    if name is not None:
        wanted["name"] = name
    found = {
        "trust domain": identity.trust_domain,
        "role": identity.role,
        "site": identity.site,
        "name": identity.name,
    }
    for what, value in wanted.items():
        if found[what] != value and reloading:
            raise ReloadError(
                f"{cert_path}: is for {identity.uri}; a reload keeps the {what} {value!r} "
                "(restart to change it)"
            )
        if found[what] != value:
            raise ReloadError(f"{cert_path}: is for {identity.uri}, not of the {what} {value!r}")
    return identity


def check_configured_certificate(
    file: Path,
    key: str,
    cert_path: Path,
    ca_path: Path,
    *,
    role: str,
    site: str | None = None,
    name: str | None = None,
    ca_key: str | None = None,
    reloading: bool = False,
) -> Identity:
    """`check_own_certificate` of the certificate a role is about to present, failing as
    a bad config does: a ConfigError naming `file` and `key`, or `ca_key` (when given) for
    a CA file that does not load: the key the user has to fix, in the same words before
    a start (exit 2: a process must not start with a certificate every peer refuses, and
    report ready while each handshake fails) and in a refused reload's error line."""
    try:
        load_certs(ca_path)
    except PkiError as exc:
        raise ConfigError(file, ca_key or key, str(exc)) from None
    try:
        return check_own_certificate(
            cert_path, ca_path, role=role, site=site, name=name, reloading=reloading
        )
    except ReloadError as exc:
        raise ConfigError(file, key, str(exc)) from None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def keep_restart_only(running: T, new: T, keys: Sequence[str]) -> tuple[T, list[str]]:
    """`new` with the running values of `keys` (settings read only at start-up), and the
    keys whose value the file changed (to log: they need a restart)."""
    changed = [key for key in keys if getattr(running, key) != getattr(new, key)]
    if not changed:
        return new, []
    kept = dataclasses.replace(new, **{key: getattr(running, key) for key in changed})
    return kept, changed


def log_restart_needed(
    log: logging.Logger, restart: Sequence[str], next_start_error: str | None
) -> None:
    """Say, after a reload, which changed settings wait for a restart, and as an error when
    the next start would refuse them: a reload that looks fine must not hide a broken
    start. `log` is the role's logger, so the line names the role that reloaded."""
    keys = {"keys": ",".join(restart)}
    if next_start_error is not None:
        log.error(
            "reloaded; these settings need a restart, and the next start will fail: "
            + next_start_error,
            extra=keys,
        )
    elif restart:
        log.warning(
            "reloaded; these settings need a restart and keep their running values", extra=keys
        )


def set_log_level(level: str) -> None:
    """Apply a reloaded `log_level` the way relay.ops.logs.setup_logging does at start-up."""
    logs.set_level(level)
