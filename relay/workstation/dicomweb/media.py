"""Media types for WADO-RS (sans-I/O): the Accept header, transfer syntaxes, multipart parts.

The relay serves the PACS's bytes as they are (no transcoding): an instance or frame is
acceptable when the Accept header allows its transfer syntax, explicitly, by
`transfer-syntax=*` (what OHIF sends), or by omitting the parameter (we then say which
syntax it is in the part's Content-Type). A request that allows only other syntaxes gets
406. Multipart bodies are written part by part (`part_head`, `closing`) so that an
answer streams as instances arrive.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_ACCEPT",
    "AcceptError",
    "MediaRange",
    "accepts_json",
    "closing",
    "frame_media_type",
    "multipart_type",
    "negotiate",
    "new_boundary",
    "parse_accept",
    "part_head",
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


# What DICOM JSON (QIDO-RS answers, WADO-RS metadata: the one representation the relay
# gives of them, no XML) is acceptable as: application/json for clients that ask so.
JSON_RANGES: Final = frozenset({"application/dicom+json", "application/json", "application/*",
                                "*/*"})  # fmt: skip


class AcceptError(ValueError):
    """Nothing the client accepts can be served as the PACS stored it (406)."""


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
    """The media ranges of an Accept header, best first; absent: `*/*`."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ",")[:MAX_ACCEPT]:
        parts = [p.strip() for p in _split(item, ";")]
        if not parts[0]:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for p in parts[1:]:
            name, _, value = p.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
            elif name:
                params[name] = value
        if q > 0:
            ranges.append(MediaRange(parts[0].lower(), params, q))
    ranges.sort(key=lambda r: -r.q)
    return ranges


def accepts_json(ranges: list[MediaRange]) -> bool:
    """Whether DICOM JSON is acceptable (else 406: PS3.18 says so of an Accept that no
    representation meets; answering JSON to an XML client passed for success)."""
    return any(r.type in JSON_RANGES for r in ranges)


def _matches(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "", media_type):
        return True
    major, _, minor = pattern.partition("/")
    return minor == "*" and media_type.startswith(major + "/")


def negotiate(
    ranges: list[MediaRange], multipart: bool, part_types: tuple[str, ...], transfer_syntax: str
) -> str:
    """The part media type to answer with, given the stored `transfer_syntax`; AcceptError
    when no range allows it. `part_types`: what the resource can be (first preferred)."""
    for r in ranges:
        if multipart and r.type not in ("multipart/related", "multipart/*", "*/*"):
            continue
        if not multipart and r.type.startswith("multipart/"):
            continue
        for part in part_types:
            if not _matches(r.inner, part):
                continue
            wanted = r.params.get("transfer-syntax")
            if wanted in (None, "*", transfer_syntax):
                return part
            if wanted in _UNCOMPRESSED and transfer_syntax == wanted:
                return part
    raise AcceptError(
        f"the stored transfer syntax is {transfer_syntax}; the relay does not transcode "
        "(ask with transfer-syntax=* or that syntax)"
    )


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
