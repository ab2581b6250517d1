"""The agent's half of certificate renewal: sign a new certificate for a device.

The exchange and the device's half are in relay.trust.renewal. The agent signs only for
the identity that the sealed session's inner TLS authenticated (relay.seal: never for
one a gateway names), and only if that device is not revoked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.agent.audit import Outcome
from relay.agent.registry import RegistryError
from relay.agent.signer import RequestRefused, Signer, csr_identity_uri, load_csr, read_request
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import write_json
from relay.proto import ErrorCode
from relay.trust import pki
from relay.trust.identity import Identity
from relay.trust.renewal import EXCHANGE_TIMEOUT, MAX_REQUEST, PROTOCOL_VERSION

__all__ = ["RenewOutcome", "serve_renew_stream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenewOutcome:
    """How a renewal request ended (`result` is a short stable code, for metrics)."""

    result: str  # ok, not_device, revoked, wrong_identity, bad_csr, oversized, malformed, ...
    message: str
    device: str | None = None
    serial: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


async def serve_renew_stream(
    stream: ByteStream,
    signer: Signer,
    peer: Identity | None,
    *,
    timeout: float = EXCHANGE_TIMEOUT,  # noqa: ASYNC109 - bounds the whole exchange
) -> RenewOutcome:
    """Serve one renewal stream for `peer`, the identity that the sealed session's inner
    TLS authenticated (None: not inside a session). Never raises for what the device does."""
    audit, now = signer.audit, signer.now
    device_uri = peer.uri if peer is not None else ""
    try:
        async with asyncio.timeout(timeout):
            identity = _vouched_device(peer, signer.ca_cert, signer.site)
            if await asyncio.to_thread(signer.registry.is_revoked, identity.name):
                raise RequestRefused("revoked", "this device is revoked")
            request = await read_request(
                stream, limit=MAX_REQUEST, version=PROTOCOL_VERSION, what="renewal"
            )
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
    audit.renewal(
        now=now(),
        device=device_uri or "unknown",
        outcome=Outcome.SERIOUS_FAILURE if severe else Outcome.MINOR_FAILURE,
        description=f"{result}: {message}",
    )
    log.warning("renewal refused", extra={"result": result, "device": device_uri})
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
