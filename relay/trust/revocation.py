"""Control messages between an agent and a gateway about device trust.

Shared by both sides; imports only the standard library and relay.trust.identity, so the
gateway may import it (no DICOM, compression or SQLite).

kind "revoke" (agent -> gateway), body JSON:

    {"v": 1, "full": bool, "part": i, "parts": n, "devices": ["spiffe://TD/device/SITE/NAME", ...]}

- full = false: an incremental update; these devices are now revoked (parts = 1).
- full = true: the complete list of the site's revoked devices, sent by the agent as
  the first thing on every new link, so a restarted gateway relearns it before it serves
  that site. It is split into `parts` messages (each fits the protocol's smallest frame);
  the gateway replaces the site's set only once all parts have arrived, in order.

kind "refusal" (gateway -> the agents of the site concerned), body JSON:

    {"v": 1, "reason": "revoked", "identity": "spiffe://...", "peer": "203.0.113.9:50122",
     "suppressed": 0}

A link the gateway refused, for the agent's audit trail: reason, claimed identity (if a
certificate was verified) and source address, never any payload. `suppressed` counts the
refusals the gateway did not report since the previous one (it rate-limits reports).

kind "enroll-result" (agent -> the gateway that carried the enrollment stream), body
JSON {"v": 1, "result": "expired"}: lets the gateway count enrollment outcomes by result
in its metrics, since the exchange itself is opaque to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from relay.trust.identity import IdentityError, parse_spiffe_uri
from relay.wire import KIND_ENROLL_RESULT, KIND_REFUSAL, KIND_REVOKE

__all__ = [
    "ENROLL_RESULTS",
    "KIND_ENROLL_RESULT",
    "KIND_REFUSAL",
    "KIND_REVOKE",
    "MAX_BODY",
    "MAX_PARTS",
    "MAX_REVOKED",
    "Refusal",
    "RevocationAssembler",
    "RevocationError",
    "RevocationList",
    "RevocationUpdate",
    "decode_enroll_result",
    "decode_refusal",
    "decode_revocations",
    "encode_enroll_result",
    "encode_refusal",
    "encode_revocations",
]

VERSION: Final = 1
#: Largest body we produce or accept: fits the protocol's minimum MAX_FRAME (16 KiB)
#: with the frame header and the kind, so it can be sent before the peer's SETTINGS.
MAX_BODY: Final = 15 * 1024
MAX_PARTS: Final = 4096
#: Revoked devices per site a gateway holds (about 100 bytes each: a few MB at most).
MAX_REVOKED: Final = 100_000
MAX_PEER: Final = 64
MAX_IDENTITY: Final = 512
_REASON_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PEER_RE: Final = re.compile(r"[0-9A-Za-z.:\[\]%_-]{1,64}")
#: Outcomes of an enrollment attempt as judged by the agent (metric label values).
ENROLL_RESULTS: Final = frozenset(
    {
        "ok",
        "unknown",
        "forged",
        "expired",
        "reused",
        "wrong_device",
        "revoked",
        "bad_csr",
        "wrong_identity",
        "oversized",
        "malformed",
        "timeout",
        "aborted",
        "internal",
        # a code bound to a directory user (agent with `directory:`)
        "password_required",
        "wrong_password",
        "account_disabled",
        "not_in_group",
        "directory_unavailable",
        "no_user",
    }
)


class RevocationError(ValueError):
    """A control message is malformed or not allowed; str() is one line."""


def _dumps(value: dict[str, object]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _loads(body: bytes, what: str) -> dict[str, object]:
    if len(body) > MAX_BODY:
        raise RevocationError(f"{what} message larger than {MAX_BODY} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RevocationError(f"{what} message is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise RevocationError(f"{what} message is not a JSON object")
    if value.get("v") != VERSION:
        raise RevocationError(f"{what} message has unsupported version {value.get('v')!r}")
    return value


def _exact_keys(value: dict[str, object], keys: set[str], what: str) -> None:
    if set(value) != keys:
        extra = sorted(set(value) - keys)
        missing = sorted(keys - set(value))
        raise RevocationError(f"{what} message: unexpected keys {extra}, missing {missing}")


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RevocationError(f"{what} must be an integer")
    return value


# --- revoke ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationUpdate:
    """One decoded "revoke" message."""

    devices: tuple[str, ...]
    full: bool
    part: int = 0
    parts: int = 1


def _check_device_uri(uri: object) -> str:
    if not isinstance(uri, str):
        raise RevocationError("device entries must be strings")
    try:
        identity = parse_spiffe_uri(uri)
    except IdentityError as exc:
        raise RevocationError(f"bad device id: {exc}") from None
    if identity.role != "device":
        raise RevocationError(f"not a device id: {uri!r}")
    return uri


def encode_revocations(
    devices: Iterable[str], *, full: bool, max_body: int = MAX_BODY
) -> list[bytes]:
    """Bodies of "revoke" messages carrying `devices` (SPIFFE ids), in order.

    An incremental update is split into several independent messages if needed; a full
    list into the parts of one snapshot. A full list of no devices is one message (it
    still tells a gateway that the site revokes nothing).
    """
    ids = sorted({_check_device_uri(d) for d in devices})
    if full and len(ids) > MAX_REVOKED:
        raise RevocationError(f"more than {MAX_REVOKED} revoked devices")
    chunks: list[list[str]] = [[]]
    # Room for the envelope with the largest counters, then each id with quotes and comma.
    envelope = len(
        _dumps({"v": VERSION, "full": full, "part": MAX_PARTS, "parts": MAX_PARTS, "devices": []})
    )
    size = envelope
    for uri in ids:
        item = len(uri) + 3
        if envelope + item > max_body:
            raise RevocationError(f"device id too long for one message: {uri[:80]!r}")
        if size + item > max_body and chunks[-1]:
            chunks.append([])
            size = envelope
        chunks[-1].append(uri)
        size += item
    if not full:
        chunks = [c for c in chunks if c]
    if len(chunks) > MAX_PARTS:
        raise RevocationError(f"revocation list needs more than {MAX_PARTS} messages")
    bodies = []
    for i, chunk in enumerate(chunks):
        parts = len(chunks) if full else 1
        body = _dumps(
            {"v": VERSION, "full": full, "part": i if full else 0, "parts": parts, "devices": chunk}
        )
        assert len(body) <= max_body
        bodies.append(body)
    return bodies


def decode_revocations(body: bytes) -> RevocationUpdate:
    """Parse and strictly validate one "revoke" body; RevocationError otherwise."""
    value = _loads(body, "revoke")
    _exact_keys(value, {"v", "full", "part", "parts", "devices"}, "revoke")
    full = value["full"]
    if not isinstance(full, bool):
        raise RevocationError("revoke message: 'full' must be true or false")
    part, parts = _int(value["part"], "part"), _int(value["parts"], "parts")
    if not 1 <= parts <= MAX_PARTS or not 0 <= part < parts:
        raise RevocationError(f"revoke message: part {part} of {parts} is out of range")
    if not full and parts != 1:
        raise RevocationError("revoke message: an incremental update has one part")
    devices = value["devices"]
    if not isinstance(devices, list):
        raise RevocationError("revoke message: 'devices' must be a list")
    ids = tuple(_check_device_uri(d) for d in devices)
    if len(set(ids)) != len(ids):
        raise RevocationError("revoke message: duplicate device ids")
    return RevocationUpdate(ids, full, part, parts)


class RevocationAssembler:
    """Joins the parts of a full snapshot arriving on one agent link (one per link).

    `feed()` returns an update to apply: incremental ones at once, a snapshot once its
    last part arrives (as one RevocationUpdate with parts = 1). A part out of order is
    an error (messages on a link are ordered, so it means a broken peer).
    """

    def __init__(self) -> None:
        self._parts: list[str] | None = None
        self._expected = 0
        self._total = 0

    def feed(self, update: RevocationUpdate) -> RevocationUpdate | None:
        if not update.full:
            return update
        if update.part == 0:
            self._parts, self._expected, self._total = [], 0, update.parts
        if self._parts is None or update.part != self._expected or update.parts != self._total:
            self._parts = None
            raise RevocationError(
                f"revoke snapshot part {update.part} of {update.parts} arrived out of order"
            )
        self._parts.extend(update.devices)
        if len(self._parts) > MAX_REVOKED:
            self._parts = None
            raise RevocationError(f"revoke snapshot of more than {MAX_REVOKED} devices")
        self._expected += 1
        if self._expected < self._total:
            return None
        devices, self._parts = tuple(self._parts), None
        return RevocationUpdate(devices, True)


class RevocationList:
    """What a gateway holds in memory: revoked device ids, by site.

    An agent may only speak for its own site and trust domain: anything else in its
    update is refused as a whole (RevocationError), nothing is applied.
    """

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._by_site: dict[str, set[str]] = {}
        self._complete: set[str] = set()

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_site.values())

    def __contains__(self, uri: object) -> bool:
        return self.is_revoked(uri)

    def is_revoked(self, uri: object) -> bool:
        if not isinstance(uri, str):
            return False
        try:
            site = parse_spiffe_uri(uri).site
        except IdentityError:
            return False
        return uri in self._by_site.get(site or "", ())

    def has_snapshot(self, site: str) -> bool:
        """Whether a full list for `site` has arrived since this gateway started."""
        return site in self._complete

    def devices(self, site: str) -> frozenset[str]:
        return frozenset(self._by_site.get(site, ()))

    def apply(self, site: str, update: RevocationUpdate) -> list[str]:
        """Apply a whole update (see RevocationAssembler) from an agent of `site`.

        Returns the ids revoked by it that were not revoked before, sorted: the gateway
        closes their live links. A snapshot replaces the site's set (so a device removed
        from the agent's list is let in again).
        """
        for uri in update.devices:
            identity = parse_spiffe_uri(uri)
            if identity.trust_domain != self.trust_domain or identity.site != site:
                raise RevocationError(f"an agent of site {site!r} may not revoke {uri}")
        current = self._by_site.get(site, set())
        if update.full:
            new = set(update.devices)
            self._complete.add(site)
        else:
            new = current | set(update.devices)
        if len(new) > MAX_REVOKED:
            raise RevocationError(f"more than {MAX_REVOKED} revoked devices for site {site!r}")
        added = sorted(new - current)
        if new:
            self._by_site[site] = new
        else:
            self._by_site.pop(site, None)
        return added


# --- refusal --------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A link the gateway refused: why, who it claimed to be, and from where."""

    reason: str
    identity: str = ""  # a SPIFFE id if a certificate was verified, else ""
    peer: str = ""  # source "host:port"
    suppressed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not _REASON_RE.fullmatch(self.reason):
            raise RevocationError("refusal reason must be 1-32 of a-z 0-9 _")
        if not isinstance(self.identity, str) or len(self.identity) > MAX_IDENTITY:
            raise RevocationError(f"refusal identity longer than {MAX_IDENTITY}")
        if self.identity:
            try:
                parse_spiffe_uri(self.identity)
            except IdentityError as exc:
                raise RevocationError(f"refusal identity: {exc}") from None
        if not isinstance(self.peer, str) or (self.peer and not _PEER_RE.fullmatch(self.peer)):
            raise RevocationError("refusal peer must be a host:port of at most 64 characters")
        if (
            not isinstance(self.suppressed, int)
            or isinstance(self.suppressed, bool)
            or not 0 <= self.suppressed < 2**53
        ):
            raise RevocationError("refusal 'suppressed' must be a non-negative integer")


def encode_refusal(refusal: Refusal) -> bytes:
    return _dumps(
        {
            "v": VERSION,
            "reason": refusal.reason,
            "identity": refusal.identity,
            "peer": refusal.peer,
            "suppressed": refusal.suppressed,
        }
    )


def decode_refusal(body: bytes) -> Refusal:
    value = _loads(body, "refusal")
    _exact_keys(value, {"v", "reason", "identity", "peer", "suppressed"}, "refusal")
    reason, identity, peer = value["reason"], value["identity"], value["peer"]
    if not isinstance(reason, str) or not isinstance(identity, str) or not isinstance(peer, str):
        raise RevocationError("refusal message: reason, identity and peer must be strings")
    return Refusal(reason, identity, peer, _int(value["suppressed"], "suppressed"))


# --- enroll-result --------------------------------------------------------------------


def encode_enroll_result(result: str) -> bytes:
    if result not in ENROLL_RESULTS:
        raise RevocationError(f"unknown enrollment result {result!r}")
    return _dumps({"v": VERSION, "result": result})


def decode_enroll_result(body: bytes) -> str:
    value = _loads(body, "enroll-result")
    _exact_keys(value, {"v", "result"}, "enroll-result")
    result = value["result"]
    if not isinstance(result, str) or result not in ENROLL_RESULTS:
        raise RevocationError(f"unknown enrollment result {result!r}")
    return result
