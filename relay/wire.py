"""Every name that crosses the wire, in one place.

The byte layout of frames lives in relay/proto (and relay/PROTOCOL.md); this module holds
the *names* that the layers above the core put into those frames: TLS ALPN ids, stream
targets, header keys and values, and CONTROL message kinds. Gateway, agent and
workstation all import them from here, so a name can be grepped once and changed once.
relay/PROTOCOL.md lists the same table for readers of the wire.

This module imports nothing: the gateway may use it without pulling in anything else.
"""

from __future__ import annotations

from typing import Final

# -- TLS ALPN ids: one per endpoint role on the gateway's port (section "Links").
ALPN_DEVICE: Final = "dmzrelay-device/1"
"""A device (workstation) link to a gateway."""
ALPN_AGENT: Final = "dmzrelay-agent/1"
"""An agent link to a gateway."""
ALPN_ENROLL: Final = "dmzrelay-enroll/1"
"""A PC without a certificate yet, enrolling through a gateway."""
ALPN_SESSION: Final = "dmzrelay-session/1"
"""Inside a `session` stream: the sealed TLS between a device and its site's agent."""
ALPN_ENROLL_SEAL: Final = "dmzrelay-enroll-seal/1"
"""Inside an `enroll` stream: the sealed TLS of an enrollment (agent authenticated only)."""
TUNNEL_ALPNS: Final = {ALPN_DEVICE: "device", ALPN_AGENT: "agent"}
"""ALPN id -> the role whose certificate the link must present."""

# -- Stream targets: the `target` header of an OPEN.
HEADER_TARGET: Final = "target"
TARGET_DICOM: Final = "dicom"
"""One DICOM operation (relay/dicom/PROTOCOL-DICOM.md)."""
TARGET_ENROLL: Final = "enroll"
"""An enrollment exchange (docs/ENROLLMENT.md)."""
TARGET_RENEW: Final = "renew"
"""A certificate renewal over the device's own link."""
TARGET_SESSION: Final = "session"
"""A sealed device-agent session (DESIGN.md section 10)."""
TCP_TARGET_PREFIX: Final = "tcp:"
"""`tcp:<service>`: a TCP connection to a service of the agent's allow-list."""


def tcp_target(service: str) -> str:
    """The target of a stream to the agent's TCP service `service`."""
    return TCP_TARGET_PREFIX + service


# -- Header keys set by the opener.
HEADER_SITE: Final = "site"
"""Enrollment: the site the enrollment code names (the PC has no certificate yet)."""
HEADER_CODEC: Final = "codec"
"""Stream compression of a TCP service stream; value CODEC_ZSTD or absent."""
CODEC_ZSTD: Final = "zstd"
HEADER_DICOM_VERSION: Final = "dicom-version"
"""Version of the DICOM message codec spoken on a `dicom` stream."""
HEADER_PRIORITY: Final = "priority"
"""The stream's priority, RFC 9218 syntax (`u=6`, `u=3, i=?0`): urgency 0-7 (lower is
sent first, default 3) and incremental (default true here). relay/proto/priority.py."""
HEADER_DICOM_PIXELS: Final = "dicom-pixels"
"""The pixel codecs a workstation decodes (comma-separated, e.g. `jpegls,htj2k,jpegxl`); without
it the agent never sends an instance with encoded pixels (relay/dicom/PROTOCOL-DICOM.md)."""
HEADER_DICOM_CONTENT: Final = "dicom-content"
"""What a `dicom` retrieve stream carries of each instance; absent: everything."""
DICOM_CONTENT_HEADERS: Final = "headers"
"""Each instance without its Pixel Data value (relay/dicom/headers_only.py); an agent
that does not know the header sends full instances, which the workstation notices."""

# -- Header keys that only the gateway may set; it strips them from what devices send.
# (No identity header: the agent knows a device from its sealed session's certificate.)
RESERVED_PREFIX: Final = "x-relay-"
HEADER_PEER: Final = "x-relay-peer"
"""Enrollment: the PC's source address, for the agent's audit trail and rate reports."""
HEADER_ENROLL_RESULTS: Final = "x-relay-enroll-results"
"""Enrollment: the version of the enroll-result labels the forwarding gateway counts
(relay/trust/revocation.py ENROLL_RESULTS_VERSION); absent: 1, an older gateway."""

# -- CONTROL message kinds (relay/trust/revocation.py has their bodies).
KIND_REVOKE: Final = "revoke"
"""Agent -> gateway: revocation list snapshot or increment."""
KIND_REFUSAL: Final = "refusal"
"""Gateway -> agent: a refused device link, for the audit trail."""
KIND_ENROLL_RESULT: Final = "enroll-result"
"""Agent -> gateway: the outcome of an enrollment, for the gateway's metrics."""
KIND_HELLO: Final = "hello"
"""Agent <-> gateway: the "revoke" versions each end speaks (the agent first, the gateway
answers once); an end that does not know the kind ignores it."""
