"""The agent's side of `relay enroll`: judge the code and the CSR, sign, record, audit.

The exchange on one stream (target `enroll`, opened by the PC over the gateway's
enrollment ALPN; messages framed by relay.net.jsonframes):

1. agent -> PC  {"v": 1, "ca_pem": "..."}                    at once, before any secret
2. PC -> agent  {"v": 1, "token_id", "secret", "device", "csr_pem"[, "password"]}
                                                                      at most 16 KiB
3. agent -> PC  {"v": 1, "status": "ok", "cert_pem", "ca_pem"}
             or {"v": 1, "status": "refused", "reason": "<one line>"}

The CA comes first so that the PC can check, before it sends the secret, that the CA
matches the fingerprint pinned in its code and that the gateway's TLS certificate was
issued by it: a man in the middle gets nothing it could replay.

Every attempt ends in one audit event and one EnrollOutcome (for the caller's metrics).
A refused attempt never consumes the code; only a successful one does, or the wrong
password that uses a code's last try (below).

With a directory (`directory:`), every code names a directory user and the request must
carry that user's password (inside the sealed session, like the secret; never logged
or audited): the agent checks the code without spending it, binds as the user and
checks the group, and only then redeems the code. The refusal says one of "wrong
password", "account disabled", "not in group", "directory unavailable; try again later";
the audit event names the user and the directory's detail.

Whoever holds a code (an intercepted e-mail, a photo of the QR) must not get an online
oracle for its user's password, nor lock the user out of Active Directory: each bind is
counted on the code before it is made, and the MAX_PASSWORD_FAILURES-th wrong password
burns the code (the PC is told it can no longer be used, too many wrong passwords, and
to ask IT for a new one; audited as a major failure); every later attempt with it is
refused the same way, result `burnt`, without asking the directory. Only a wrong
password (or an unknown user, which the PC is told the same way) keeps its try: a
directory outage (also one that answers the bind busy or unavailable), a disabled
account or a user outside the group gives it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.agent.audit import AuditLog, Outcome
from relay.agent.directory import Directory, Refusal, RefusalReason
from relay.agent.registry import MAX_PASSWORD_FAILURES, Redeemed, RedeemStatus, RegistryError
from relay.agent.signer import (
    RequestRefused,
    Signer,
    csr_identity_uri,
    load_csr,
    read_request,
)
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import write_json
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode
from relay.trust import pki
from relay.trust.codes import CodeError, check_token_id, decode_secret
from relay.trust.identity import Identity, IdentityError
from relay.wire import HEADER_PEER

__all__ = ["EXCHANGE_TIMEOUT", "MAX_REQUEST", "EnrollOutcome", "serve_enroll_stream"]

log = logging.getLogger(__name__)

#: "enrollment refused" lines: per source address, and over all sources (the gateway
#: names the address, and a compromised gateway can make up as many as it likes), so a
#: flood at the enrollment door cannot fill the agent's log. The audit trail keeps its
#: own budget (relay.agent.audit.budget); the metrics count every refusal.
REFUSAL_LINES_TOTAL: Final = (5.0, 200)
_refusal_lines = LogLimiter(total=REFUSAL_LINES_TOTAL)

PROTOCOL_VERSION: Final = 1
MAX_REQUEST: Final = 16 * 1024
#: The whole exchange, agent side; below the gateway's 30 s enrollment link lifetime.
EXCHANGE_TIMEOUT: Final = 20.0
#: The PC's line once a code's password tries are spent (registry.MAX_PASSWORD_FAILURES).
BURNT_MESSAGE: Final = (
    "this enrollment code can no longer be used (too many wrong passwords); ask IT for a new one"
)


@dataclass(frozen=True)
class EnrollOutcome:
    """How an attempt ended. `result` is one of relay.trust.revocation.ENROLL_RESULTS."""

    result: str
    message: str
    device: str | None = None
    serial: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _field(request: dict[str, object], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str):
        raise RequestRefused("malformed", f"malformed request: {name!r} is missing or not text")
    return value


_REDEEM_MESSAGES: Final = {
    RedeemStatus.UNKNOWN: ("unknown", "unknown enrollment code (not issued by this site)"),
    RedeemStatus.FORGED: ("forged", "the enrollment code is not valid (wrong secret)"),
    RedeemStatus.REUSED: ("reused", "this enrollment code was already used; ask IT for a new one"),
    RedeemStatus.REVOKED: (
        "revoked",
        "this device is revoked; ask IT to enroll it under a new name",
    ),
    # No result of its own (the gateway counts ENROLL_RESULTS): the code cannot be used
    # for this device name any more, as for a code issued for another name.
    RedeemStatus.IN_USE: (
        "wrong_device",
        "this device name was enrolled for another user since the code was made; ask IT "
        "for a code for another name",
    ),
    # Tried again after its wrong passwords burnt it (the attempt that burnt it was a
    # `wrong_password`): the directory is not asked any more.
    RedeemStatus.BURNT: ("burnt", BURNT_MESSAGE),
}


_DIRECTORY_RESULTS: Final = {
    RefusalReason.WRONG_PASSWORD: "wrong_password",
    RefusalReason.UNKNOWN_USER: "wrong_password",
    RefusalReason.DISABLED: "account_disabled",
    RefusalReason.NOT_IN_GROUP: "not_in_group",
    RefusalReason.UNAVAILABLE: "directory_unavailable",
}
#: What spends one of a code's password tries: what the PC is told is a wrong password.
_WRONG_PASSWORD: Final = frozenset({RefusalReason.WRONG_PASSWORD, RefusalReason.UNKNOWN_USER})


class UserRefused(RequestRefused):
    """A refusal for a code's directory user: `detail` (for the audit trail) may say more
    than the PC is told (e.g. that the user does not exist). `burnt`: this attempt spent
    the code's last password try (audited as a major failure: the code is gone)."""

    def __init__(
        self,
        result: str,
        message: str,
        *,
        user: str,
        detail: str | None = None,
        burnt: bool = False,
    ) -> None:
        super().__init__(result, message)
        self.user = user
        self.detail = f"user {user}: {detail or message}"
        self.burnt = burnt


async def _check_user(
    signer: Signer,
    *,
    directory: Directory | None,
    request: dict[str, object],
    token_id: str,
    secret: bytes,
    device: str,
) -> str | None:
    """The directory user the code binds the device to, once the directory accepted the
    password (None: no directory, a code without a user). Spends nothing but, for a
    wrong password, one of the code's tries (the last one burns it)."""
    checked = await asyncio.to_thread(
        signer.registry.redeem_token, token_id, secret, device, signer.now(), consume=False
    )
    if checked.status is RedeemStatus.BURNT and checked.user is not None:
        result, message = _REDEEM_MESSAGES[RedeemStatus.BURNT]
        raise UserRefused(result, message, user=checked.user)  # the audit names whose
    if not checked.ok:
        raise _redeem_refusal(checked, device)
    user = checked.user
    if directory is None:
        if user is not None:
            raise RequestRefused(
                "directory_unavailable",
                "directory unavailable (this agent has no directory: configured)",
            )
        return None
    if user is None:
        raise RequestRefused(
            "no_user", "this enrollment code names no directory user; ask IT for a new one"
        )
    password = request.get("password")
    if not isinstance(password, str) or not password:
        raise UserRefused(
            "password_required",
            f"this code is for directory user {user!r}: enter the password "
            "(relay enroll asks for it)",
            user=user,
        )
    registry = signer.registry
    started = await asyncio.to_thread(registry.start_password_attempt, token_id)
    if started is not RedeemStatus.OK:
        result, message = _REDEEM_MESSAGES[started]
        raise UserRefused(result, message, user=user)
    # Cancelled here (the PC gone, the exchange's timeout), the try stays spent: the
    # bind may still be made, and a try given back would be a free guess.
    answer = await directory.authenticate(user, password)
    wrong = isinstance(answer, Refusal) and answer.reason in _WRONG_PASSWORD
    burnt = await asyncio.to_thread(
        registry.end_password_attempt, token_id, signer.now(), wrong=wrong
    )
    if isinstance(answer, Refusal):
        if burnt:
            raise UserRefused(
                "wrong_password",
                BURNT_MESSAGE,
                user=user,
                detail=f"{answer.detail}; the code is burnt (too many wrong passwords, "
                f"limit {MAX_PASSWORD_FAILURES})",
                burnt=True,
            )
        message = answer.message
        if answer.reason is RefusalReason.UNAVAILABLE:  # nothing spent: worth trying again
            message = f"{message}; try again later"
        raise UserRefused(
            _DIRECTORY_RESULTS[answer.reason], message, user=user, detail=answer.detail
        )
    return user


def _redeem_refusal(redeemed: Redeemed, device: str) -> RequestRefused:
    if redeemed.status is RedeemStatus.EXPIRED:
        when = redeemed.expires_at.isoformat(timespec="seconds") if redeemed.expires_at else "?"
        return RequestRefused(
            "expired", f"this enrollment code expired at {when}; ask IT for a new one"
        )
    if redeemed.status is RedeemStatus.WRONG_DEVICE:
        return RequestRefused(
            "wrong_device",
            f"this enrollment code was issued for device {redeemed.device!r}, not {device!r}",
        )
    result, message = _REDEEM_MESSAGES[redeemed.status]
    return RequestRefused(result, message)


async def serve_enroll_stream(
    stream: ByteStream,
    signer: Signer,
    *,
    timeout: float = EXCHANGE_TIMEOUT,  # noqa: ASYNC109 - bounds the whole exchange
    directory: Directory | None = None,
) -> EnrollOutcome:
    """Serve one enrollment stream to its end; never raises for anything the PC does.

    The CSR must ask for exactly
    spiffe://TD/device/SITE/DEVICE, where TD is the CA's trust domain, SITE ours and
    DEVICE the device name the code was issued for.
    """
    audit, now, ca_cert = signer.audit, signer.now, signer.ca_cert
    peer = stream.headers.get(HEADER_PEER) or None
    claimed = "unknown"
    token_id: str | None = None
    user: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await write_json(stream, {"v": PROTOCOL_VERSION, "ca_pem": _pem(ca_cert)})
            request = await read_request(
                stream, limit=MAX_REQUEST, version=PROTOCOL_VERSION, what="enrollment"
            )
            device = _field(request, "device")
            claimed = device[:64]
            try:
                token_id = check_token_id(request.get("token_id"))
                secret = decode_secret(_field(request, "secret"))
                identity = Identity.device(signer.trust_domain, signer.site, device)
            except (CodeError, IdentityError, pki.PkiError) as exc:
                raise RequestRefused("malformed", f"malformed request: {exc}") from None
            claimed = identity.uri
            csr, public_key = load_csr(request.get("csr_pem"))
            asked = csr_identity_uri(csr)
            if asked != identity.uri:
                raise RequestRefused(
                    "wrong_identity",
                    f"the CSR asks for another identity ({asked or 'none'}, expected "
                    f"{identity.uri})",
                )
            user = await _check_user(
                signer,
                directory=directory,
                request=request,
                token_id=token_id,
                secret=secret,
                device=device,
            )
            redeemed = await asyncio.to_thread(
                signer.registry.redeem_token, token_id, secret, device, now()
            )
            if not redeemed.ok:
                raise _redeem_refusal(redeemed, device)
            if redeemed.user != user:  # the code changed in between: never bind another
                raise RequestRefused("internal", "the enrollment code changed; try again")
            issued = await signer.issue(public_key, identity, user)
            cert, serial = issued.cert, issued.serial
            audit.enrollment(
                now=issued.issued_at,
                device=identity.uri,
                token_id=token_id,
                peer=peer,
                outcome=Outcome.SUCCESS,
                description=f"certificate issued, valid until {cert.not_valid_after_utc}"
                + (f", bound to directory user {user}" if user else ""),
                serial=serial,
                user=user,
            )
            await write_json(
                stream,
                {
                    "v": PROTOCOL_VERSION,
                    "status": "ok",
                    "cert_pem": _pem(cert),
                    "ca_pem": _pem(ca_cert),
                },
            )
            await stream.write_eof()
            log.info(
                "device enrolled",
                extra={"device": identity.uri, "serial": serial, "user": user or ""},
            )
            return EnrollOutcome("ok", "enrolled", identity.uri, serial)
    except RequestRefused as exc:
        refusal, answer, severe = exc, True, False
    except TimeoutError:
        refusal = RequestRefused("timeout", "the enrollment took too long")
        answer, severe = False, False
    except StreamResetError:
        refusal = RequestRefused("aborted", "the PC or the gateway aborted the enrollment")
        answer, severe = False, False
    except (RegistryError, pki.PkiError) as exc:
        log.error("enrollment failed", extra={"error": str(exc)})
        refusal = RequestRefused(
            "internal", "the agent could not complete the enrollment; try again"
        )
        answer, severe = True, True
    return await _refuse(
        stream,
        audit=audit,
        now=now,
        refusal=refusal,
        claimed=claimed,
        token_id=token_id,
        peer=peer,
        user=user,
        answer=answer,
        severe=severe,
    )


async def _refuse(
    stream: ByteStream,
    *,
    audit: AuditLog,
    now: Callable[[], datetime],
    refusal: RequestRefused,
    claimed: str,
    token_id: str | None,
    peer: str | None,
    user: str | None = None,
    answer: bool = True,
    severe: bool = False,
) -> EnrollOutcome:
    detail = refusal.message
    outcome = Outcome.SERIOUS_FAILURE if severe else Outcome.MINOR_FAILURE
    if isinstance(refusal, UserRefused):
        detail, user = refusal.detail, refusal.user
        if refusal.burnt:
            outcome = Outcome.MAJOR_FAILURE
    audit.enrollment(
        now=now(),
        device=claimed,
        token_id=token_id,
        peer=peer,
        outcome=outcome,
        description=f"{refusal.result}: {detail}",
        user=user,
    )
    held = _refusal_lines.allow(peer or "", time.monotonic())
    if held is not None:
        log.warning(
            "enrollment refused",
            extra={"result": refusal.result, "device": claimed, "peer": peer or "",
                   "held_back": held},
        )  # fmt: skip
    if answer:
        try:
            async with asyncio.timeout(5.0):
                await write_json(
                    stream,
                    {"v": PROTOCOL_VERSION, "status": "refused", "reason": refusal.message},
                )
                await stream.write_eof()
        except (StreamResetError, TimeoutError, OSError):
            pass
    else:
        stream.reset(ErrorCode.CANCEL)
    return EnrollOutcome(refusal.result, refusal.message, claimed)
