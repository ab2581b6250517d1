"""Media types for WADO-RS (sans-I/O): the Accept header, transfer syntaxes, multipart parts.

The relay serves the PACS's bytes as they are (no transcoding): an instance or frame is
acceptable when the Accept header allows its transfer syntax, explicitly, by
`transfer-syntax=*` (what OHIF sends), or by omitting the parameter (we then say which
syntax it is in the part's Content-Type). A request that allows only other syntaxes gets
406. Multipart bodies are written part by part (`part_head`, `closing`) so that an
answer streams as instances arrive.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_ACCEPT",
    "AcceptError",
    "AcceptTooLong",
    "MediaRange",
    "acceptable",
    "accepts_json",
    "candidate",
    "closing",
    "frame_media_type",
    "multipart_type",
    "negotiable",
    "negotiate",
    "new_boundary",
    "parse_accept",
    "part_head",
    "quality",
    "syntaxes_to_try",
]

MAX_ACCEPT: Final = 32  # media ranges in one Accept header
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
IMPLICIT_LE: Final = "1.2.840.10008.1.2"
# Compressed syntaxes with a single-frame media type of their own (PS3.18 table 8.7.3-2).
FRAME_TYPES: Final = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}
_UNCOMPRESSED: Final = frozenset({EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.2"})
# A syntax no Accept names (not a UID): what `negotiable` tries for all the unnamed ones.
UNNAMED_SYNTAX: Final = "unnamed"


# What DICOM JSON (QIDO-RS answers, WADO-RS metadata: the one representation the relay
# gives of them, no XML) is acceptable as: application/json for clients that ask so.
DICOM_JSON: Final = "application/dicom+json"
PLAIN_JSON: Final = "application/json"
_NONE: Final[Mapping[str, str]] = {}


class AcceptError(ValueError):
    """Nothing the client accepts can be served as the PACS stored it (406)."""


class AcceptTooLong(ValueError):
    """More than MAX_ACCEPT media ranges (400): the ranges past the bound were dropped,
    and the 406 that followed blamed the ranges kept for what the others asked."""


@dataclass(frozen=True)
class MediaRange:
    """One range of an Accept header: `multipart/related; type="application/dicom"; ...`."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def inner(self) -> str:
        """The part type: the `type` parameter of a multipart range, else the range itself."""
        if self.type == "multipart/related":
            return self.params.get("type", "")
        return self.type


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first; absent: `*/*`; AcceptTooLong
    past MAX_ACCEPT ranges. Ranges with q=0
    are kept (last): they refuse what they match when they are its most specific range
    (`quality`), so they are not ranges to answer with (`acceptable`)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    items = [item for item in _split(header, ",") if item.strip()]
    if len(items) > MAX_ACCEPT:
        raise AcceptTooLong(f"Accept: more than {MAX_ACCEPT} media ranges")
    ranges: list[MediaRange] = []
    for item in items:
        parts = [p.strip() for p in _split(item, ";")]
        if not parts[0]:
            continue
        params: dict[str, str] = {}
        q: float | None = 1.0
        for p in parts[1:]:
            name, _, value = p.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                q = _weight(value)
            elif name:
                params[name] = value
        if q is not None:  # a malformed weight: the range says nothing, for or against
            ranges.append(MediaRange(parts[0].lower(), params, q))
    ranges.sort(key=lambda r: -r.q)
    return ranges


def _weight(text: str) -> float | None:
    """A q value, within 0..1; None when it is no number (or NaN)."""
    try:
        q = float(text)
    except ValueError:
        return None
    return max(0.0, min(1.0, q)) if not math.isnan(q) else None


def acceptable(ranges: list[MediaRange]) -> list[MediaRange]:
    """The ranges that may be answered with (q > 0), best first."""
    return [r for r in ranges if r.q > 0]


def _specificity(
    r: MediaRange, media_type: str, params: Mapping[str, str]
) -> tuple[int, int] | None:
    """How specifically range `r` names `media_type` with `params` (RFC 9110 12.5.1: a
    type beats `type/*`, which beats `*/*`; more parameters beat fewer); None: it does not
    match. A `type` parameter may be a range itself (`application/*`), `transfer-syntax=*`
    matches any syntax without counting, and a parameter the answer has no value for
    (`charset`: DICOM JSON is UTF-8 whatever is asked) is not compared."""
    if r.type == media_type:
        level = 2
    elif r.type == "*/*":
        level = 0
    elif r.type.endswith("/*") and media_type.startswith(r.type[:-1]):
        level = 1
    else:
        return None
    counted = 0
    for name, value in r.params.items():
        given = params.get(name)
        if given is None:  # not a parameter of this answer (charset, say): not compared
            continue
        if name == "type":
            if not _matches(value.lower(), given):
                return None
        elif value not in ("*", given):
            return None
        counted += value != "*"
    return level, counted


def quality(ranges: list[MediaRange], media_type: str, params: Mapping[str, str] = _NONE) -> float:
    """The quality the client gives `media_type` with `params` (RFC 9110 12.5.1): that of
    the most specific range matching it, so `application/dicom+json;q=0, */*` refuses
    DICOM JSON and accepts the rest; 0: not acceptable (also when no range matches)."""
    best: tuple[int, int] | None = None
    q = 0.0
    for r in ranges:
        rank = _specificity(r, media_type, params)
        if rank is None:
            continue
        if best is None or rank > best:
            best, q = rank, r.q
        elif rank == best:
            q = max(q, r.q)
    return q


def accepts_json(ranges: list[MediaRange]) -> bool:
    """Whether DICOM JSON is acceptable (else 406: PS3.18 says so of an Accept that no
    representation meets; answering JSON to an XML client passed for success). It is
    answered as application/dicom+json; `application/json` is taken for it only when a
    range names it, so `application/dicom+json;q=0, */*` is 406, not the same JSON."""
    if quality(ranges, DICOM_JSON) > 0:
        return True
    named = any(r.type == PLAIN_JSON for r in ranges)
    return named and quality(ranges, PLAIN_JSON) > 0


def _matches(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "", media_type):
        return True
    major, _, minor = pattern.partition("/")
    return minor == "*" and media_type.startswith(major + "/")


def candidate(multipart: bool, part: str, transfer_syntax: str) -> tuple[str, dict[str, str]]:
    """The media type and parameters of an answer (for `quality`): a multipart body of
    `part`s, or one `part`, in `transfer_syntax`."""
    if multipart:
        return "multipart/related", {"type": part, "transfer-syntax": transfer_syntax}
    return part, {"transfer-syntax": transfer_syntax}


def negotiate(
    ranges: list[MediaRange], multipart: bool, part_types: tuple[str, ...], transfer_syntax: str
) -> str:
    """The part media type to answer with, given the stored `transfer_syntax`; AcceptError
    when no range allows it (or the most specific range matching it has q=0).
    `part_types`: what the resource can be (first preferred)."""
    for r in acceptable(ranges):
        if multipart and r.type not in ("multipart/related", "multipart/*", "*/*"):
            continue
        if not multipart and r.type.startswith("multipart/"):
            continue
        for part in part_types:
            if not _matches(r.inner, part):
                continue
            wanted = r.params.get("transfer-syntax")
            if wanted not in (None, "*", transfer_syntax):
                continue
            if quality(ranges, *candidate(multipart, part, transfer_syntax)) > 0:
                return part
    raise AcceptError(
        f"the stored transfer syntax is {transfer_syntax}; the relay does not transcode "
        "(ask with transfer-syntax=* or that syntax)"
    )


def syntaxes_to_try(ranges: list[MediaRange]) -> tuple[str, ...]:
    """The stored syntaxes that stand for every one before it is known: those the ranges
    name, and one they do not (every other syntax is answered as that one is)."""
    named = {r.params["transfer-syntax"] for r in ranges if "transfer-syntax" in r.params}
    return (*sorted(named - {"*"}), UNNAMED_SYNTAX)


def negotiable(ranges: list[MediaRange], multipart: bool, part_types: tuple[str, ...]) -> bool:
    """Whether some stored syntax could be answered (`negotiate`): a request for which
    none could is refused (406) before anything is retrieved."""
    for ts in syntaxes_to_try(ranges):
        try:
            negotiate(ranges, multipart, part_types, ts)
        except AcceptError:
            continue
        return True
    return False


def frame_media_type(transfer_syntax: str) -> tuple[str, ...]:
    """What a frame in `transfer_syntax` may be served as (first preferred)."""
    if transfer_syntax in _UNCOMPRESSED:
        return ("application/octet-stream",)
    own = FRAME_TYPES.get(transfer_syntax)
    return ("application/octet-stream", own) if own else ("application/octet-stream",)


def new_boundary() -> str:
    return f"relay-{secrets.token_hex(16)}"


def multipart_type(boundary: str, part_type: str) -> str:
    """The response's Content-Type."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, content_type: str, location: str | None = None) -> bytes:
    """What precedes one part's bytes (its delimiter and headers)."""
    head = f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def part_type_with_ts(part: str, transfer_syntax: str) -> str:
    return f"{part}; transfer-syntax={transfer_syntax}"
