"""Control messages between an agent and a gateway about device trust.

Shared by both sides; imports only the standard library and relay.trust.identity, so the
gateway may import it (no DICOM, compression or SQLite).

kind "revoke" (agent -> gateway), body JSON, version 2 (agents since signed notices):

    {"v": 2, "full": bool, "part": i, "parts": n,
     "devices": [["spiffe://TD/device/SITE/NAME", "rn1.<time>.<signature>"], ...]}

Each device comes with its revocation notice: a short string the agent signed with the
site CA key (relay.trust.notice). The gateway does not verify it (it cannot be trusted
to, and it must not need the means): it checks only its form (NOTICE_RE, at most
MAX_NOTICE characters), keeps it beside the id and hands it to the revoked device in its
GOAWAY REVOKED reason (`goaway_reason`), where the device verifies it. Version 1 (older
agents) has "devices": ["spiffe://...", ...] and no notices; a gateway still takes it,
and its devices are told in the old plain words, which a current workstation does not heed.

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
in its metrics, since the exchange itself is opaque to it. An older gateway closes the
link on a result it does not know, so a gateway announces the version of ENROLL_RESULTS
it counts on each enrollment stream it forwards (header `x-relay-enroll-results`), and
the agent sends a newer label only to a gateway that announced it
(`enroll_result_for_gateway`: "burnt" is "reused" for an older gateway). A current
gateway counts a label it does not know as ENROLL_RESULT_OTHER and keeps the link.

kind "hello" (both ways on an agent link), body JSON {"v": 1, "revoke": [1, 2]}: the
"revoke" versions the sender speaks. The agent sends it first on every link, before its
version-1 full list (which any gateway takes, so the site is routed at once); a current
gateway answers it once with the versions it accepts, and from then on the agent sends
that link the highest version both speak: a version-2 full list, then version-2
increments (relay/agent/linktrust.py). An older gateway ignores the unknown kind and
never answers, so it gets version 1 for as long as the link lives; an older agent never
says hello and ignores the answer. At most MAX_HELLO bytes; unknown keys, and versions
it does not know in "revoke", are ignored, so a later hello may say more (a later "v"
keeps "revoke").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from relay.trust.identity import IdentityError, parse_spiffe_uri
from relay.wire import KIND_ENROLL_RESULT, KIND_HELLO, KIND_REFUSAL, KIND_REVOKE

__all__ = [
    "ENROLL_RESULTS",
    "ENROLL_RESULTS_VERSION",
    "ENROLL_RESULT_OTHER",
    "KIND_ENROLL_RESULT",
    "KIND_HELLO",
    "KIND_REFUSAL",
    "KIND_REVOKE",
    "MAX_BODY",
    "MAX_HELLO",
    "MAX_NOTICE",
    "MAX_PARTS",
    "MAX_REVOKED",
    "REVOKED_REASON",
    "REVOKE_VERSION",
    "REVOKE_VERSIONS",
    "Hello",
    "Refusal",
    "RevocationAssembler",
    "RevocationError",
    "RevocationList",
    "RevocationUpdate",
    "decode_enroll_result",
    "decode_hello",
    "decode_refusal",
    "decode_revocations",
    "encode_enroll_result",
    "encode_hello",
    "encode_refusal",
    "encode_revocations",
    "enroll_result_for_gateway",
    "enroll_result_label",
    "goaway_reason",
    "increment_without_notices",
    "notice_in_reason",
]

VERSION: Final = 1  # refusal, enroll-result, and "revoke" without notices (older agents)
REVOKE_VERSION: Final = 2  # "revoke" with a signed notice per device
#: The "revoke" versions this code sends and takes, announced in its "hello".
REVOKE_VERSIONS: Final = (VERSION, REVOKE_VERSION)
#: Largest "hello" body taken (today's is 22 bytes), and most versions read from it.
MAX_HELLO: Final = 1024
MAX_HELLO_VERSIONS: Final = 16
#: Largest body we produce or accept: fits the protocol's minimum MAX_FRAME (16 KiB)
#: with the frame header and the kind, so it can be sent before the peer's SETTINGS.
MAX_BODY: Final = 15 * 1024
MAX_PARTS: Final = 4096
#: Revoked devices per site a gateway holds. Each costs about 270 bytes with its notice
#: (an id of ~55 characters, a 102-character notice, a dict slot; tracemalloc, see
#: tests/trust/test_revocation.py, which holds it under 400): ~27 MB per site at this
#: bound, twice that while a new snapshot replaces the old; ~3 MB for 10,000.
MAX_REVOKED: Final = 100_000
#: Longest notice a gateway stores and forwards (today's are NOTICE_LENGTH characters).
MAX_NOTICE: Final = 128
#: What a gateway checks of a notice: its alphabet and length, nothing else.
NOTICE_RE: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NOTICE}}}")
#: The words of a gateway's GOAWAY REVOKED; a notice follows after one space.
REVOKED_REASON: Final = "this device was revoked; enroll it again"
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
        # since labels version 2: a code burnt by wrong passwords, tried again
        "burnt",
    }
)
#: The version of ENROLL_RESULTS this gateway counts, announced to the agent in the
#: HEADER_ENROLL_RESULTS of each enrollment stream it forwards. A gateway without the
#: header (version 1) closes the agent link on a label it does not know.
ENROLL_RESULTS_VERSION: Final = 2
#: Labels added after version 1, and the version-1 label a gateway that does not
#: announce a newer version is sent instead.
_STAND_INS_V1: Final = {"burnt": "reused"}
#: The metric label a gateway counts a well-formed result it does not know under (a
#: newer agent's): a label is only a metric, not worth the agent link.
ENROLL_RESULT_OTHER: Final = "other"


class RevocationError(ValueError):
    """A control message is malformed or not allowed; str() is one line."""


def _dumps(value: dict[str, object]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _object(body: bytes, what: str, limit: int) -> dict[str, object]:
    """The JSON object of a body of at most `limit` bytes; RevocationError otherwise."""
    if len(body) > limit:
        raise RevocationError(f"{what} message larger than {limit} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RevocationError(f"{what} message is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise RevocationError(f"{what} message is not a JSON object")
    return value


def _loads(body: bytes, what: str, versions: tuple[int, ...] = (VERSION,)) -> dict[str, object]:
    value = _object(body, what, MAX_BODY)
    version = value.get("v")
    if isinstance(version, bool) or version not in versions:
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
    """One decoded "revoke" message.

    `notices` is empty (version 1: none) or one per device, in the same order.
    """

    devices: tuple[str, ...]
    full: bool
    part: int = 0
    parts: int = 1
    notices: tuple[str, ...] = ()
    version: int = VERSION


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


def _check_notice(notice: object) -> str:
    if not isinstance(notice, str) or not NOTICE_RE.fullmatch(notice):
        raise RevocationError(
            f"a revocation notice must be 1-{MAX_NOTICE} characters of A-Z a-z 0-9 . _ -"
        )
    return notice


def encode_revocations(
    devices: Iterable[str],
    *,
    full: bool,
    max_body: int = MAX_BODY,
    notices: Mapping[str, str] | None = None,
) -> list[bytes]:
    """Bodies of "revoke" messages carrying `devices` (SPIFFE ids), in order.

    With `notices` (id -> notice, one for every device) they are version 2, else version
    1 (what older agents send). An incremental update is split into several independent
    messages if needed; a full list into the parts of one snapshot. A full list of no
    devices is one message (it still tells a gateway that the site revokes nothing).
    """
    ids = sorted({_check_device_uri(d) for d in devices})
    if full and len(ids) > MAX_REVOKED:
        raise RevocationError(f"more than {MAX_REVOKED} revoked devices")
    version = VERSION if notices is None else REVOKE_VERSION
    entries: list[object] = []
    for uri in ids:
        if notices is None:
            entries.append(uri)
        elif uri not in notices:
            raise RevocationError(f"no revocation notice for {uri[:80]!r}")
        else:
            entries.append([uri, _check_notice(notices[uri])])
    chunks: list[list[object]] = [[]]
    # Room for the envelope with the largest counters, then each entry with its comma.
    envelope = len(
        _dumps({"v": version, "full": full, "part": MAX_PARTS, "parts": MAX_PARTS, "devices": []})
    )
    size = envelope
    for entry in entries:
        item = len(_dumps({"e": entry})) - len(b'{"e":}') + 1
        if envelope + item > max_body:
            raise RevocationError(f"device id too long for one message: {str(entry)[:80]!r}")
        if size + item > max_body and chunks[-1]:
            chunks.append([])
            size = envelope
        chunks[-1].append(entry)
        size += item
    if not full:
        chunks = [c for c in chunks if c]
    if len(chunks) > MAX_PARTS:
        raise RevocationError(f"revocation list needs more than {MAX_PARTS} messages")
    bodies = []
    for i, chunk in enumerate(chunks):
        parts = len(chunks) if full else 1
        body = _dumps(
            {"v": version, "full": full, "part": i if full else 0, "parts": parts, "devices": chunk}
        )
        assert len(body) <= max_body
        bodies.append(body)
    return bodies


def _entry(entry: object, version: int) -> tuple[str, str]:
    """(id, notice) of one "devices" entry; the notice is "" in version 1."""
    if version == VERSION:
        return _check_device_uri(entry), ""
    if not isinstance(entry, list) or len(entry) != 2:
        raise RevocationError("revoke message: each device is an [id, notice] pair")
    return _check_device_uri(entry[0]), _check_notice(entry[1])


def decode_revocations(body: bytes) -> RevocationUpdate:
    """Parse and strictly validate one "revoke" body (version 1 or 2); RevocationError
    with one line otherwise."""
    value = _loads(body, "revoke", (VERSION, REVOKE_VERSION))
    _exact_keys(value, {"v", "full", "part", "parts", "devices"}, "revoke")
    version = _int(value["v"], "v")
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
    pairs = [_entry(d, version) for d in devices]
    ids = tuple(uri for uri, _ in pairs)
    if len(set(ids)) != len(ids):
        raise RevocationError("revoke message: duplicate device ids")
    notices = tuple(n for _, n in pairs) if version == REVOKE_VERSION else ()
    return RevocationUpdate(ids, full, part, parts, notices, version)


def increment_without_notices(body: bytes) -> list[bytes]:
    """The version-1 form of an incremental "revoke" body, for a gateway that did not
    announce version 2 (the same devices, no notices; a version-1 body as it is)."""
    update = decode_revocations(body)
    if update.full:
        raise RevocationError("a full list is rebuilt for its version, not converted")
    if update.version == VERSION:
        return [body]
    return encode_revocations(update.devices, full=False)


class RevocationAssembler:
    """Joins the parts of a full snapshot arriving on one agent link (one per link).

    `feed()` returns an update to apply: incremental ones at once, a snapshot once its
    last part arrives (as one RevocationUpdate with parts = 1). A part out of order, or
    of another version than the first, is an error (messages on a link are ordered, so
    it means a broken peer).
    """

    def __init__(self) -> None:
        self._parts: list[str] | None = None
        self._notices: list[str] = []
        self._version = VERSION
        self._expected = 0
        self._total = 0

    def feed(self, update: RevocationUpdate) -> RevocationUpdate | None:
        if not update.full:
            return update
        if update.part == 0:
            self._parts, self._notices, self._expected, self._total = [], [], 0, update.parts
            self._version = update.version
        if (
            self._parts is None
            or update.part != self._expected
            or update.parts != self._total
            or update.version != self._version
        ):
            self._parts = None
            raise RevocationError(
                f"revoke snapshot part {update.part} of {update.parts} arrived out of order"
            )
        self._parts.extend(update.devices)
        self._notices.extend(update.notices)
        if len(self._parts) > MAX_REVOKED:
            self._parts = None
            raise RevocationError(f"revoke snapshot of more than {MAX_REVOKED} devices")
        self._expected += 1
        if self._expected < self._total:
            return None
        devices, notices = tuple(self._parts), tuple(self._notices)
        self._parts, self._notices = None, []
        return RevocationUpdate(devices, True, notices=notices, version=self._version)


class RevocationList:
    """What a gateway holds in memory: revoked device ids and their notices, by site.

    An agent may only speak for its own site and trust domain: anything else in its
    update is refused as a whole (RevocationError), nothing is applied. A notice is
    opaque here: the revoked device verifies it, never the gateway.
    """

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._by_site: dict[str, dict[str, str]] = {}  # site -> id -> notice ("" if none)
        self._complete: set[str] = set()
        #: Sites whose agent sent devices without notices (an older agent), logged once.
        self.unsigned_sites: set[str] = set()

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_site.values())

    def __contains__(self, uri: object) -> bool:
        return self.is_revoked(uri)

    def _site_of(self, uri: object) -> dict[str, str]:
        if not isinstance(uri, str):
            return {}
        try:
            site = parse_spiffe_uri(uri).site
        except IdentityError:
            return {}
        return self._by_site.get(site or "", {})

    def is_revoked(self, uri: object) -> bool:
        return uri in self._site_of(uri)

    def notice(self, uri: str) -> str:
        """The agent's notice for a revoked device ("" if it sent none or it is not revoked)."""
        return self._site_of(uri).get(uri, "")

    def has_snapshot(self, site: str) -> bool:
        """Whether a full list for `site` has arrived since this gateway started."""
        return site in self._complete

    def devices(self, site: str) -> frozenset[str]:
        return frozenset(self._by_site.get(site, ()))

    def apply(self, site: str, update: RevocationUpdate) -> list[str]:
        """Apply a whole update (see RevocationAssembler) from an agent of `site`.

        Returns the ids revoked by it that were not revoked before, sorted: the gateway
        closes their live links. A snapshot replaces the site's set (so a device removed
        from the agent's list is let in again). An update without notices (version 1: an
        older agent, or a current one before its version-2 list, or another link of the
        site's agents still on version 1) keeps a notice already held for the same device.
        """
        for uri in update.devices:
            identity = parse_spiffe_uri(uri)
            if identity.trust_domain != self.trust_domain or identity.site != site:
                raise RevocationError(f"an agent of site {site!r} may not revoke {uri}")
        if update.notices and len(update.notices) != len(update.devices):
            raise RevocationError("revoke update: one notice per device")
        notices = update.notices or ("",) * len(update.devices)
        current = self._by_site.get(site, {})
        new: dict[str, str] = {} if update.full else dict(current)
        for uri, notice in zip(update.devices, notices, strict=True):
            new[uri] = notice or current.get(uri, "")
        if update.full:
            self._complete.add(site)
        if len(new) > MAX_REVOKED:
            raise RevocationError(f"more than {MAX_REVOKED} revoked devices for site {site!r}")
        added = sorted(new.keys() - current.keys())
        if new:
            self._by_site[site] = new
        else:
            self._by_site.pop(site, None)
        return added


def goaway_reason(notice: str) -> str:
    """The reason of a gateway's GOAWAY REVOKED: the plain words, then the agent's notice
    (if it sent one) after one space. At most 40 + 1 + MAX_NOTICE bytes, within the
    protocol's 256."""
    return f"{REVOKED_REASON} {notice}" if notice else REVOKED_REASON


def notice_in_reason(reason: str) -> str | None:
    """The notice a GOAWAY REVOKED reason carries (`goaway_reason`'s form), else None.
    What the notice is worth is for relay.trust.notice to say."""
    head, _, notice = reason.rpartition(" ")
    if head != REVOKED_REASON or not NOTICE_RE.fullmatch(notice):
        return None
    return notice


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


def enroll_result_for_gateway(result: str, announced: str | None) -> str:
    """The label to report `result` to a gateway that announced `announced` (the value
    of its HEADER_ENROLL_RESULTS, None without one): a label it knows, since a gateway
    closes the agent link on one it does not (all the site's sessions through it)."""
    try:
        version = int(announced) if announced is not None else 1
    except ValueError:
        version = 1
    if version >= ENROLL_RESULTS_VERSION:
        return result
    return _STAND_INS_V1.get(result, result)


class UnknownEnrollResult(RevocationError):
    """A well-formed enroll-result whose label this side does not know (a newer agent's)."""


def decode_enroll_result(body: bytes) -> str:
    value = _loads(body, "enroll-result")
    _exact_keys(value, {"v", "result"}, "enroll-result")
    result = value["result"]
    if not isinstance(result, str) or not _REASON_RE.fullmatch(result):
        raise RevocationError("enroll-result: 'result' must be 1-32 of a-z 0-9 _")
    if result not in ENROLL_RESULTS:
        raise UnknownEnrollResult(f"unknown enrollment result {result!r}")
    return result


def enroll_result_label(body: bytes) -> str:
    """The metric label of an enroll-result: its result, or ENROLL_RESULT_OTHER for a
    label this gateway does not know. RevocationError only if the body is malformed."""
    try:
        return decode_enroll_result(body)
    except UnknownEnrollResult:
        return ENROLL_RESULT_OTHER


# --- hello ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """What the other end of an agent link said it speaks: its "revoke" versions."""

    revoke: frozenset[int]

    def revoke_version(self) -> int:
        """The highest "revoke" version both ends speak (VERSION if none in common)."""
        common = self.revoke & set(REVOKE_VERSIONS)
        return max(common, default=VERSION)


def encode_hello(revoke: Iterable[int] = REVOKE_VERSIONS) -> bytes:
    return _dumps({"v": VERSION, "revoke": sorted(set(revoke))})


def decode_hello(body: bytes) -> Hello:
    """Parse a "hello": "v" an integer >= 1 (a later one keeps "revoke"), "revoke" a list
    of at most MAX_HELLO_VERSIONS positive integers; other keys are ignored."""
    value = _object(body, "hello", MAX_HELLO)
    version = value.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version < VERSION:
        raise RevocationError(f"hello message has unsupported version {version!r}")
    revoke = value.get("revoke")
    if not isinstance(revoke, list) or len(revoke) > MAX_HELLO_VERSIONS:
        raise RevocationError(f"hello: 'revoke' must be a list of at most {MAX_HELLO_VERSIONS}")
    for item in revoke:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item < 2**31:
            raise RevocationError("hello: 'revoke' versions must be positive integers")
    return Hello(frozenset(revoke))
