"""The agent's half of certificate renewal: sign a new certificate for a device.

The exchange and the device's half are in relay.trust.renewal. The agent signs only for
the identity that the sealed session's inner TLS authenticated (relay.seal: never for
one a gateway names), only if that device is not revoked, and only when the device's own
schedule would ask: every enrolled device may be hostile, and each signature costs the
agent a signature, a registry write and an audit line that all devices share.

- Due: the newest certificate issued to the device (by issue time: once
  pki.device_lifetime is shortened it ends before older ones) has reached two thirds of
  its lifetime (relay.trust.renewal.next_renewal_time), less DUE_SLACK for clocks that
  disagree. Once per certificate the one before it (or, for the first one recorded, an
  offline one never recorded) may stand in: the answer that carried the newest may have
  been lost, and the device then still renews the one it holds.
- At least MIN_INTERVAL between two certificates of one device (the registry's issue
  times, so it holds across restarts), and one renewal of a device at a time
  (`RenewalPace`, in memory, the DeviceAuthority's).
- Every refusal goes to the audit trail, whose budget (relay.agent.audit.budget) writes
  the first ones of a device in full and counts the rest into one aggregate an hour, so
  a device that insists does not rotate the trail away; the log's "renewal refused"
  lines are limited per device (relay.ops.loglimit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.agent.audit import Outcome
from relay.agent.registry import CertificateRow, RegistryError
from relay.agent.signer import RequestRefused, Signer, csr_identity_uri, load_csr, read_request
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import write_json
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode
from relay.trust import pki
from relay.trust.identity import Identity
from relay.trust.renewal import (
    EXCHANGE_TIMEOUT,
    MAX_REQUEST,
    PROTOCOL_VERSION,
    next_renewal_time,
)

__all__ = [
    "DUE_SLACK",
    "MIN_INTERVAL",
    "RenewOutcome",
    "RenewalPace",
    "check_due",
    "serve_renew_stream",
]

log = logging.getLogger(__name__)

#: A certificate counts as due this much before the device's own schedule says so (its
#: clock may be ahead of ours); at most a tenth of the certificate's lifetime.
DUE_SLACK: Final = timedelta(hours=1)
#: Between two certificates issued to one device, at least this long; at most a tenth of
#: the site's device lifetime, so that short lifetimes (tests, seconds) still renew.
MIN_INTERVAL: Final = timedelta(minutes=10)
#: "renewal refused" log lines, per device (a hostile one asks in a loop).
_refusal_lines = LogLimiter()


@dataclass(frozen=True)
class RenewOutcome:
    """How a renewal request ended (`result` is a short stable code, for metrics)."""

    # ok, not_device, busy, revoked, not_due, too_soon, wrong_identity, bad_csr, oversized,
    # malformed, timeout, aborted, internal
    result: str
    message: str
    device: str | None = None
    serial: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


class RenewalPace:
    """The renewal in flight of each device, in memory, so that concurrent requests
    cannot all pass the due check before one is recorded. Bounded by the devices."""

    def __init__(self) -> None:
        self._in_flight: set[str] = set()

    def begin(self, device: str) -> bool:
        """Start a renewal of `device`; False while another one is in flight."""
        if device in self._in_flight:
            return False
        self._in_flight.add(device)  # at most one entry per device: bounded by them
        return True

    def end(self, device: str) -> None:
        self._in_flight.discard(device)


def check_due(
    device: str, newest: list[CertificateRow], now: datetime, lifetime: timedelta
) -> None:
    """Refuse a renewal that the device's own schedule would not ask for yet.

    `newest`: the device's last certificates, newest issued first (none: issued offline by
    `relay pki issue`, never recorded); `lifetime`: the site's, for MIN_INTERVAL. Raises
    RequestRefused ("too_soon" or "not_due") with a line the device logs.
    """
    if not newest:
        return
    interval = min(MIN_INTERVAL, lifetime / 10)
    since = now - newest[0].issued_at
    if timedelta(0) <= since < interval:
        raise RequestRefused(
            "too_soon",
            f"too soon: a certificate was issued to {device} {since.total_seconds():.0f} s "
            f"ago, and one is issued at most every {interval.total_seconds():.0f} s",
        )
    # The newest, or once the one before it (or one never recorded): the answer that
    # carried the newest may not have reached the device, which still holds that one.
    if len(newest) < 2 or any(now >= _due_at(cert) for cert in newest[:2]):
        return
    raise RequestRefused(
        "not_due",
        f"not due: the newest certificate of {device} is due for renewal from "
        f"{_due_at(newest[0]):%Y-%m-%d %H:%M:%S}Z (the agent's clock)",
    )


def _due_at(cert: CertificateRow) -> datetime:
    """When the agent takes `cert` as due: the device's schedule less the slack."""
    slack = min(DUE_SLACK, (cert.not_after - cert.not_before) / 10)
    return next_renewal_time(cert.not_before, cert.not_after) - slack


async def serve_renew_stream(
    stream: ByteStream,
    signer: Signer,
    peer: Identity | None,
    pace: RenewalPace,
    *,
    timeout: float = EXCHANGE_TIMEOUT,  # noqa: ASYNC109 - bounds the whole exchange
) -> RenewOutcome:
    """Serve one renewal stream for `peer`, the identity that the sealed session's inner
    TLS authenticated (None: not inside a session); `pace`: the agent's one RenewalPace.
    Never raises for what the device does."""
    audit, now = signer.audit, signer.now
    device_uri = peer.uri if peer is not None else ""
    began = ""
    try:
        async with asyncio.timeout(timeout):
            identity = _vouched_device(peer, signer.ca_cert, signer.site)
            if not pace.begin(identity.name):
                raise RequestRefused("busy", "busy: another renewal of this device is under way")
            began = identity.name
            if await asyncio.to_thread(signer.registry.is_revoked, identity.name):
                raise RequestRefused("revoked", "this device is revoked")
            request = await read_request(
                stream, limit=MAX_REQUEST, version=PROTOCOL_VERSION, what="renewal"
            )
            newest = await asyncio.to_thread(signer.registry.newest_certificates, identity.name)
            check_due(identity.name, newest, now(), signer.lifetime)
            csr, public_key = load_csr(request.get("csr_pem"))
            asked = csr_identity_uri(csr)
            if asked != identity.uri:
                raise RequestRefused(
                    "wrong_identity",
                    f"the CSR asks for another identity ({asked or 'none'}, this link is "
                    f"{identity.uri})",
                )
            issued = await signer.issue(public_key, identity)
            cert, serial = issued.cert, issued.serial
            audit.renewal(
                now=issued.issued_at,
                device=identity.uri,
                outcome=Outcome.SUCCESS,
                description="certificate renewed",
                serial=serial,
                not_after=cert.not_valid_after_utc,
            )
            await write_json(
                stream,
                {
                    "v": PROTOCOL_VERSION,
                    "status": "ok",
                    "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                    "ca_pem": signer.ca_cert.public_bytes(serialization.Encoding.PEM).decode(
                        "ascii"
                    ),
                },
            )
            await stream.write_eof()
            return RenewOutcome("ok", "renewed", identity.uri, serial)
    except RequestRefused as refusal:
        result, message, answer, severe = refusal.result, refusal.message, True, False
    except TimeoutError:
        result, message, answer, severe = "timeout", "the renewal took too long", False, False
    except StreamResetError:
        result, message, answer, severe = "aborted", "the device aborted the renewal", False, False
    except (RegistryError, pki.PkiError) as exc:
        log.error("renewal failed", extra={"error": str(exc)})
        result, message, answer, severe = (
            "internal",
            "the agent could not renew the certificate; it will be retried",
            True,
            True,
        )
    finally:
        if began:
            pace.end(began)
    audit.renewal(
        now=now(),
        device=device_uri or "unknown",
        outcome=Outcome.SERIOUS_FAILURE if severe else Outcome.MINOR_FAILURE,
        description=f"{result}: {message}",
    )
    held = _refusal_lines.allow(device_uri, time.monotonic())
    if held is not None:
        log.warning(
            "renewal refused", extra={"result": result, "device": device_uri, "held_back": held}
        )
    if answer:
        try:
            async with asyncio.timeout(5.0):
                await write_json(
                    stream, {"v": PROTOCOL_VERSION, "status": "refused", "reason": message}
                )
                await stream.write_eof()
        except (StreamResetError, TimeoutError, OSError):
            pass
    else:
        stream.reset(ErrorCode.CANCEL)
    return RenewOutcome(result, message, device_uri or None)


def _vouched_device(peer: Identity | None, ca_cert: x509.Certificate, site: str) -> Identity:
    """The device to renew: the one the inner TLS authenticated (the session already
    checked it against our CA, role and site; checked again here, cheaply)."""
    if peer is None:
        raise RequestRefused("not_device", "renewal is only available inside a device's session")
    try:
        trust_domain = pki.trust_domain_of_ca(ca_cert)
    except pki.PkiError as exc:
        raise RequestRefused("not_device", f"unusable CA: {exc}") from None
    if peer.role != "device" or peer.trust_domain != trust_domain or peer.site != site:
        raise RequestRefused("not_device", f"{peer.uri} is not a device of this site")
    return peer
