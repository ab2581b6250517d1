"""Two SealCores against each other in memory: delivery, identity checks, bounds."""

from __future__ import annotations

import ssl
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.seal.core import (
    HandshakeComplete,
    PlaintextReceived,
    SealBufferFull,
    SealCore,
    SealLimits,
    SealStateError,
    SessionClosed,
    SessionFailed,
)
from relay.seal.policy import ALPN_SESSION, agent_check, session_client_context
from relay.seal.session import refusal_goaway
from relay.trust.identity import Identity

from .helpers import SITE, TD, Pkis, duplex, make_pkis


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Pkis:
    return make_pkis(tmp_path_factory.mktemp("seal-pki"))


def _plain(events: Sequence[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, PlaintextReceived))


def _failure(events: Sequence[object]) -> SessionFailed:
    failures = [e for e in events if isinstance(e, SessionFailed)]
    assert len(failures) == 1, events
    return failures[0]


def test_handshake_authenticates_both_ends(pkis: Pkis) -> None:
    d = duplex(pkis)
    d.run()
    (hs_c,) = [e for e in d.client_events if isinstance(e, HandshakeComplete)]
    (hs_s,) = [e for e in d.server_events if isinstance(e, HandshakeComplete)]
    assert hs_c.peer is not None and hs_c.peer.uri == f"spiffe://{TD}/agent/{SITE}"
    assert hs_s.peer is not None and hs_s.peer.uri == f"spiffe://{TD}/device/{SITE}/ws1"
    assert hs_c.alpn == hs_s.alpn == ALPN_SESSION
    assert d.client.state == d.server.state == "open"


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in [*points, len(data)]:
        parts.append(data[last:p])
        last = p
    return [p for p in parts if p]


@given(
    messages=st.lists(st.binary(min_size=1, max_size=40_000), min_size=1, max_size=6),
    replies=st.lists(st.binary(min_size=1, max_size=5_000), max_size=4),
    cuts_up=st.lists(st.integers(min_value=0), max_size=12),
    cuts_down=st.lists(st.integers(min_value=0), max_size=12),
    early=st.booleans(),
)
def test_everything_arrives_in_order_exactly_once(  # noqa: PLR0917 - Hypothesis arguments
    pkis: Pkis,
    messages: list[bytes],
    replies: list[bytes],
    cuts_up: list[int],
    cuts_down: list[int],
    early: bool,
) -> None:
    d = duplex(pkis)
    d.to_server = lambda b: _split(b, cuts_up)
    d.to_client = lambda b: _split(b, cuts_down)
    if early:  # queued before the handshake, sent once it completes
        d.client.send(messages[0])
        d.run()
        rest = messages[1:]
    else:
        d.run()
        rest = messages
    for m in rest:
        d.client.send(m)
    for r in replies:
        d.server.send(r)
    d.run()
    assert _plain(d.server_events) == b"".join(messages)
    assert _plain(d.client_events) == b"".join(replies)
    d.client.close()
    d.run()
    assert isinstance(d.server_events[-1], SessionClosed)
    assert not any(isinstance(e, SessionFailed) for e in d.client_events + d.server_events)


@pytest.mark.parametrize(
    ("case", "side", "reason"),
    [
        ("device_of_other_site", "server", "wrong_site"),
        ("agent_of_other_site", "client", "wrong_site"),
        ("agent_cert_as_device", "server", "wrong_role"),
        ("device_cert_as_agent", "client", "wrong_role"),
        ("foreign_ca_device", "server", "unknown_ca"),
        ("foreign_ca_agent", "client", "unknown_ca"),
        ("expired_device", "server", "expired"),
        ("revoked_device", "server", "revoked"),
    ],
)
def test_handshake_refusals_have_a_clear_reason(
    pkis: Pkis, case: str, side: str, reason: str
) -> None:
    kwargs: dict[str, object] = {}
    if case == "device_of_other_site":
        kwargs["client_ctx"] = pkis.client_ctx(pkis.other_site_device)
    elif case == "agent_of_other_site":
        kwargs["server_ctx"] = pkis.server_ctx(pkis.other_site_agent)
    elif case == "agent_cert_as_device":
        kwargs["client_ctx"] = pkis.client_ctx(pkis.main.agent)
    elif case == "device_cert_as_agent":
        # A device certificate lacks serverAuth, so OpenSSL already refuses it; any
        # certificate check failing here is the point: never an open session.
        kwargs["server_ctx"] = pkis.server_ctx(pkis.device)
        reason = "bad_certificate"
    elif case == "foreign_ca_device":
        kwargs["client_ctx"] = pkis.client_ctx(pkis.foreign.device("alien"))
    elif case == "foreign_ca_agent":
        kwargs["server_ctx"] = pkis.server_ctx(pkis.foreign.agent)
    elif case == "expired_device":
        kwargs["client_ctx"] = pkis.client_ctx(pkis.expired_device)
    elif case == "revoked_device":
        kwargs["is_revoked"] = lambda ident: ident.name == "ws1"
    d = duplex(pkis, **kwargs)  # type: ignore[arg-type]
    d.client.send(b"secret request")
    d.run()
    events = d.server_events if side == "server" else d.client_events
    assert _failure(events).reason == reason
    assert b"secret request" not in _plain(d.server_events)
    # Neither side ends up open with the other: the other one fails or sees a close.
    assert d.server.state != "open" and d.client.state in ("failed", "closed", "open")
    if side == "server":
        assert any(isinstance(e, SessionFailed | SessionClosed) for e in d.client_events)


def test_refusal_message_reaches_the_peer_sealed(pkis: Pkis) -> None:
    d = duplex(pkis, is_revoked=lambda ident: True, refusal=lambda r, _: f"refused:{r}".encode())
    d.run()
    assert _failure(d.server_events).reason == "revoked"
    assert _plain(d.client_events) == b"refused:revoked"
    assert isinstance(d.client_events[-1], SessionClosed)


def test_other_protocol_version_fails_with_one_clear_line(pkis: Pkis, tmp_path: Path) -> None:
    ctx = pkis.client_ctx()
    ctx.set_alpn_protocols(["dmzrelay-session/2"])
    d = duplex(pkis, client_ctx=ctx)
    d.client.alpn = "dmzrelay-session/2"  # the newer peer expects its own version
    d.run()
    for events in (d.server_events, d.client_events):
        failure = _failure(events)
        assert failure.reason == "version"
        assert "\n" not in failure.detail and "dmzrelay-session/" in failure.detail


def test_resumption_skips_the_certificates_but_keeps_the_identity(pkis: Pkis) -> None:
    server_ctx = pkis.server_ctx()
    client_ctx = pkis.client_ctx()
    first = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx)
    first.run()
    first.server.send(b"x")  # the ticket arrives with the first server records
    first.run()
    session = first.client.session
    assert session is not None
    second = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx, session=session)
    second.run()
    (hs,) = [e for e in second.server_events if isinstance(e, HandshakeComplete)]
    assert hs.resumed
    assert hs.peer is not None and hs.peer.name == "ws1"
    # Revocation is checked on a resumed session too.
    third = duplex(
        pkis,
        client_ctx=client_ctx,
        server_ctx=server_ctx,
        session=session,
        is_revoked=lambda ident: True,
    )
    third.run()
    assert _failure(third.server_events).reason == "revoked"


def _ticket(pkis: Pkis, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A full handshake between the two contexts; the ticket the client got."""
    first = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx)
    first.run()
    first.server.send(b"x")  # the ticket arrives with the first server records
    first.run()
    assert first.client.session is not None
    return first.client.session


def test_a_resumed_session_of_an_expired_certificate_is_refused(pkis: Pkis) -> None:
    """OpenSSL checks a certificate's dates at the full handshake only, and every
    resumption issues a fresh ticket: a device whose certificate has expired since
    resumed its session for ever (a hostile one, or its stolen key and ticket, carried by
    any device's outer link), and could then renew it. Each end now checks the resumed
    certificate against its clock; within the validity, resumption works as before."""
    now = datetime.now(UTC)
    soon = pkis.main.device("soon", lifetime=timedelta(hours=1), not_before=now)
    server_ctx = pkis.server_ctx()
    client_ctx = pkis.client_ctx(soon)
    ticket = _ticket(pkis, client_ctx, server_ctx)
    later = now + timedelta(hours=1, seconds=1)

    ok = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx, session=ticket)
    ok.run()
    (hs,) = [e for e in ok.server_events if isinstance(e, HandshakeComplete)]
    assert hs.resumed and hs.peer is not None and hs.peer.name == "soon"

    refused = duplex(
        pkis,
        client_ctx=client_ctx,
        server_ctx=server_ctx,
        session=ticket,
        server_clock=lambda: later,
        refusal=refusal_goaway,
    )
    refused.run()
    failure = _failure(refused.server_events)
    assert failure.reason == "expired" and "expired at" in failure.detail
    assert refused.server.peer is None
    assert b"session refused by the agent: expired" in _plain(refused.client_events)

    # The device's end likewise: an agent certificate that expired since is refused.
    short_agent = pkis.main.issue(
        "agent-soon", Identity.agent(TD, SITE), lifetime=timedelta(hours=1), not_before=now
    )
    agent_ctx = pkis.server_ctx(short_agent)
    device_ctx = pkis.client_ctx()
    ticket = _ticket(pkis, device_ctx, agent_ctx)
    stale = duplex(
        pkis,
        client_ctx=device_ctx,
        server_ctx=agent_ctx,
        session=ticket,
        client_clock=lambda: later,
    )
    stale.run()
    assert _failure(stale.client_events).reason == "expired"
    assert not any(isinstance(e, HandshakeComplete) for e in stale.client_events)


def test_eof_without_close_notify_is_a_failure(pkis: Pkis) -> None:
    d = duplex(pkis)
    d.run()
    assert _failure(d.server.receive_data(b"")).reason == "eof"


def test_early_plaintext_is_bounded(pkis: Pkis) -> None:
    limits = SealLimits(max_early_plaintext=1000)
    d = duplex(pkis, limits=limits)
    d.client.send(b"a" * 1000)
    with pytest.raises(SealBufferFull):
        d.client.send(b"b")


def test_early_plaintext_in_small_writes_holds_no_more_than_its_bound(pkis: Pkis) -> None:
    """The bound is on memory, not only on bytes: 2-byte writes up to it used to be kept
    as one bytes object each (~43 bytes of objects per 2 bytes: 21 times the bound)."""
    bound = 64 * 1024
    d = duplex(pkis, limits=SealLimits(max_early_plaintext=bound))
    chunks = range(bound // 2)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in chunks:
            d.client.send(n.to_bytes(2, "big"))  # a new object each, as a caller's are
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    with pytest.raises(SealBufferFull):
        d.client.send(b"z")
    assert held <= bound * 1.25, held
    d.run()  # and all of it arrives, in order, once the handshake completes
    assert _plain(d.server_events) == b"".join(n.to_bytes(2, "big") for n in chunks)


def test_uncollected_ciphertext_is_bounded(pkis: Pkis) -> None:
    limits = SealLimits(max_outgoing=100_000)
    d = duplex(pkis, limits=limits)
    d.run()
    with pytest.raises(SealBufferFull):
        for _ in range(20):
            d.client.send(b"z" * 16_000)  # never collected
    assert d.client.data_to_send()  # what was accepted is still there to send
    d.client.send(b"fits again")


def test_incoming_backlog_is_bounded(pkis: Pkis) -> None:
    """A peer announcing a huge record is refused from its header, never buffered."""
    limits = SealLimits(max_incoming=32_000)
    d = duplex(pkis, limits=limits)
    d.run()
    header = bytes([23, 3, 3, 0xFF, 0xFF])  # application data, 65,535 bytes announced
    events = d.server.receive_data(header + b"\0" * 40_000)
    assert _failure(events).reason in ("protocol", "buffer")
    assert d.server._incoming.pending <= limits.max_incoming


def test_limits_must_hold_a_record() -> None:
    with pytest.raises(ValueError):
        SealLimits(max_incoming=1000)


def test_send_after_close_is_an_error(pkis: Pkis) -> None:
    d = duplex(pkis)
    d.run()
    d.client.close()
    with pytest.raises(SealStateError):
        d.client.send(b"late")


def test_enrollment_core_needs_no_client_certificate(pkis: Pkis) -> None:
    from relay.seal.policy import (
        ALPN_ENROLL_SEAL,
        enroll_client_context,
        enroll_server_context,
        no_client_check,
    )

    agent = pkis.main.agent
    server = SealCore(
        enroll_server_context(agent.cert, agent.key),
        server_side=True,
        alpn=ALPN_ENROLL_SEAL,
        check_peer=no_client_check,
    )
    client = SealCore(
        enroll_client_context(pkis.main.ca),
        server_side=False,
        alpn=ALPN_ENROLL_SEAL,
        check_peer=agent_check(TD, "main"),  # as relay enroll: the code's site
    )
    from .helpers import Duplex

    d = Duplex(client, server)
    client.send(b"code+csr")
    d.run()
    assert _plain(d.server_events) == b"code+csr"
    # Pinned to another CA: the agent is not trusted, the secret never leaves.
    stranger = SealCore(
        enroll_client_context(pkis.foreign.ca),
        server_side=False,
        alpn=ALPN_ENROLL_SEAL,
        check_peer=agent_check(TD, "main"),  # as relay enroll: the code's site
    )
    server2 = SealCore(
        enroll_server_context(agent.cert, agent.key),
        server_side=True,
        alpn=ALPN_ENROLL_SEAL,
        check_peer=no_client_check,
    )
    d2 = Duplex(stranger, server2)
    stranger.send(b"code+csr")
    d2.run()
    assert _failure(d2.client_events).reason == "unknown_ca"
    assert _plain(d2.server_events) == b""


def test_client_context_without_files_is_a_config_error(pkis: Pkis, tmp_path: Path) -> None:
    from relay.net.tls import TlsConfigError

    with pytest.raises(TlsConfigError):
        session_client_context(tmp_path / "no.crt", tmp_path / "no.key", pkis.main.ca)
    assert agent_check(TD, SITE)(None) == "no_certificate"
    assert isinstance(ssl.OPENSSL_VERSION, str)
