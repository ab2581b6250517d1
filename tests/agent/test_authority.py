"""DeviceAuthority: the agent's trust duties, wired through the real gateway on 127.0.0.1.

Enrollment from a PC, then renewal over the new device's own link (the gateway adds
x-relay-device), last seen, revocation bodies for the gateways, refusal reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from relay import wire
from relay.agent.audit import AUDIT_FILE, read_events
from relay.agent.authority import DeviceAuthority
from relay.agent.notices import NoticeSigner
from relay.agent.registry import MAX_PASSWORD_FAILURES, REGISTRY_FILE, DeviceRegistry, RedeemStatus
from relay.agent.sessions import SessionServer
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import pipe
from relay.net.dialer import dial
from relay.net.jsonframes import read_json, write_json
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.seal.policy import enroll_server_context, session_server_context
from relay.trust import pki
from relay.trust.codes import EnrollmentCode, encode_secret
from relay.trust.enroll import EnrollError, enroll
from relay.trust.identity import Identity
from relay.trust.notice import NoticeError, verify_notice
from relay.trust.renewal import renew
from relay.trust.revocation import (
    KIND_ENROLL_RESULT,
    Refusal,
    RevocationAssembler,
    RevocationList,
    decode_enroll_result,
    decode_revocations,
)
from tests.ends_helpers import running_gateway
from tests.pki_helpers import HOST, Pair, SitePki, make_pki
from tests.session_helpers import sealed

WAIT = 10.0
ROOT = Path(__file__).resolve().parents[2]


def utcnow() -> datetime:
    return datetime.now(dt.UTC)


def open_authority(site: SitePki, state: Path, **kwargs: Any) -> DeviceAuthority:
    return DeviceAuthority.open(
        site="main",
        state_dir=state,
        ca_cert=site.directory / "ca.crt",
        ca_key=site.directory / "ca.key",
        **kwargs,
    )


def test_open_creates_state_and_checks_the_ca(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state" / "deep")
    assert (tmp_path / "state" / "deep" / REGISTRY_FILE).exists()
    assert authority.identity.uri == "spiffe://hospital.test/agent/main"
    authority.close()
    other = make_pki(tmp_path / "other")
    with pytest.raises(pki.PkiError, match="does not match"):
        DeviceAuthority.open(
            site="main",
            state_dir=tmp_path / "s2",
            ca_cert=site.directory / "ca.crt",
            ca_key=other.directory / "ca.key",
        )


def test_open_refuses_the_ca_of_another_site(tmp_path: Path) -> None:
    """An agent of site `east` holding site `main`'s CA would spend enrollment codes on
    certificates that every gateway refuses (issuer of another site): it must not open."""
    site = make_pki(tmp_path / "pki")
    with pytest.raises(pki.PkiError, match="CA of site 'main'; it cannot issue for site 'east'"):
        DeviceAuthority.open(
            site="east",
            state_dir=tmp_path / "state",
            ca_cert=site.ca,
            ca_key=site.directory / "ca.key",
        )
    assert not (tmp_path / "state").exists()  # refused before anything is created


def test_agent_with_the_ca_of_another_site_does_not_start(tmp_path: Path) -> None:
    """`relay agent` exits 2 with one line naming the config file and the key: its own
    certificate (`tls.cert`, of site main, checked first at start-up) or `pki.ca_cert`."""
    site = make_pki(tmp_path / "pki")
    d = site.directory
    config = tmp_path / "agent.yaml"
    config.write_text(
        "site: east\n"
        f"gateways: ['{HOST}:9']\n"
        f"tls: {{cert: {d}/agent.crt, key: {d}/agent.key, ca: {d}/ca.crt}}\n"
        f"pki: {{ca_cert: {d}/ca.crt, ca_key: {d}/ca.key}}\n"
        "state_dir: state/\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert f"{config}: tls.cert: " in line or f"{config}: pki.ca_cert: " in line
    assert "main" in line and "'east'" in line
    assert not (tmp_path / "state").exists()


@contextlib.asynccontextmanager
async def link_to(
    port: int,
    ctx: Any,
    alpn: str,
    *,
    on_stream: Callable[[Stream], None] | None = None,
    on_control: Callable[[str, bytes], None] | None = None,
) -> AsyncIterator[Link]:
    link = await dial(
        Address(HOST, port),
        ctx,
        LinkSettings(),
        alpn=alpn,
        name=alpn,
        timeout=WAIT,
        on_stream=on_stream,
        on_control=on_control,
    )
    try:
        yield link
    finally:
        link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.wait_closed(), WAIT)


async def test_enroll_then_renew_through_the_gateway(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    ahead = [timedelta(0)]  # the renewal happens when due: 20 of 30 days on

    def clock() -> datetime:
        return utcnow() + ahead[0]

    authority = open_authority(site, tmp_path / "state", now=clock)
    tasks: list[asyncio.Task[Any]] = []
    outcomes: list[Any] = []

    def dispatch(stream: Stream) -> None:  # the agent's dispatch, reduced to renewal
        assert stream.headers["target"] == "renew"
        tasks.append(asyncio.create_task(authority.serve_renew(stream)))

    async def serve_enroll(stream: Any) -> None:
        outcomes.append(await authority.serve_enroll(stream))

    sessions = SessionServer(
        site="main",
        trust_domain=site.trust_domain,
        session_ctx=session_server_context(site.agent.cert, site.agent.key, site.ca),
        enroll_ctx=enroll_server_context(site.agent.cert, site.agent.key),
        settings=LinkSettings(),
        dispatch=dispatch,
        is_revoked=lambda peer: authority.registry.is_revoked(peer.name),
        serve_enroll=serve_enroll,
        ca_pem=site.ca.read_text(),
        touch=lambda peer: authority.touch(peer.uri),
    )
    on_stream = sessions.on_stream

    async with running_gateway(site, tmp_path) as gateway:
        agent_ctx = tls.client_context(site.agent.cert, site.agent.key, site.ca, wire.ALPN_AGENT)
        async with link_to(gateway.port, agent_ctx, wire.ALPN_AGENT, on_stream=on_stream) as agent:
            for body in authority.revocation_snapshot():  # as the agent does on link-up
                agent.send_control("revoke", body)
            token_id, secret = authority.registry.create_token("ws1", timedelta(hours=1), utcnow())
            code = EnrollmentCode(
                Address(HOST, gateway.port),
                pki.ca_fingerprint(site.ca_cert),
                "main",
                "ws1",
                token_id,
                secret,
            ).encode()
            out = tmp_path / "identity"
            await enroll(code, out, timeout=WAIT)
            first = pki.load_cert(out / "device.crt")

            device_ctx = tls.client_context(out / "device.crt", out / "device.key", out / "ca.crt")
            async with link_to(gateway.port, device_ctx, wire.ALPN_DEVICE) as device_link:
                pair = Pair(out / "device.crt", out / "device.key")
                inner = await sealed(device_link, site, pair)
                ahead[0] = timedelta(days=20)
                assert await renew(inner.open_stream, out, now=clock)
                inner.close()
            outcomes += await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert [o.result for o in outcomes] == ["ok", "ok"]
    assert authority.enrollments == {"ok": 1} and authority.renewals == {"ok": 1}
    second = pki.load_cert(out / "device.crt")
    assert second.serial_number != first.serial_number
    row = authority.registry.get_device("ws1")
    assert row is not None and row.certificates == 2 and row.last_seen is not None
    kinds = [e["kind"] for e in read_events(tmp_path / "state" / AUDIT_FILE)]
    assert kinds == ["enrollment", "renewal"]
    authority.close()


async def test_enroll_result_is_reported_on_the_link(tmp_path: Path) -> None:
    """serve_enroll sends the result as a control message on the stream's link."""
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state")
    received: list[str] = []

    class FakeLink:
        def send_control(self, kind: str, body: bytes) -> None:
            assert kind == KIND_ENROLL_RESULT
            received.append(decode_enroll_result(body))

    from relay.net.bytestream import pipe

    pc, agent_end = pipe({"target": "enroll"})
    agent_end.link = FakeLink()  # type: ignore[attr-defined]
    await pc.write_eof()
    outcome = await authority.serve_enroll(agent_end)
    assert outcome.result == "malformed" and received == ["malformed"]
    authority.close()


def burnt_code(authority: DeviceAuthority, user: str = "alice") -> tuple[str, bytes]:
    """A code whose wrong passwords burnt it (as enrollment counts them)."""
    registry = authority.registry
    token_id, secret = registry.create_token("ws1", timedelta(hours=1), utcnow(), user=user)
    for _ in range(MAX_PASSWORD_FAILURES):
        assert registry.start_password_attempt(token_id) is RedeemStatus.OK
        registry.end_password_attempt(token_id, utcnow(), wrong=True)
    return token_id, secret


async def test_a_burnt_code_is_counted_as_burnt_by_the_gateway(tmp_path: Path) -> None:
    """Attempts on a burnt code used to be counted as `reused` (agent, audit trail,
    gateway metric). Through a real gateway: `burnt` everywhere, the agent link kept."""
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state")
    outcomes: list[Any] = []

    async def serve_enroll(stream: Any) -> None:
        outcomes.append(await authority.serve_enroll(stream))

    on_stream = SessionServer(
        site="main",
        trust_domain=site.trust_domain,
        session_ctx=session_server_context(site.agent.cert, site.agent.key, site.ca),
        enroll_ctx=enroll_server_context(site.agent.cert, site.agent.key),
        settings=LinkSettings(),
        dispatch=lambda stream: stream.reset(ErrorCode.FORBIDDEN),
        serve_enroll=serve_enroll,
        ca_pem=site.ca.read_text(),
    ).on_stream
    token_id, secret = burnt_code(authority)
    code = EnrollmentCode(
        Address(HOST, 0), pki.ca_fingerprint(site.ca_cert), "main", "ws1", token_id, secret
    )
    async with running_gateway(site, tmp_path) as gateway:
        code = replace(code, gateway=Address(HOST, gateway.port))
        registry = gateway.server.metrics.registry

        def counted(result: str) -> float:
            return registry.get_sample_value("relay_enrollments_total", {"result": result}) or 0.0

        agent_ctx = tls.client_context(site.agent.cert, site.agent.key, site.ca, wire.ALPN_AGENT)
        async with link_to(gateway.port, agent_ctx, wire.ALPN_AGENT, on_stream=on_stream) as agent:
            for body in authority.revocation_snapshot():  # as the agent does on link-up
                agent.send_control("revoke", body)
            with pytest.raises(EnrollError, match="too many wrong passwords"):
                await enroll(code.encode(), tmp_path / "out", timeout=WAIT, password="pw")
            async with asyncio.timeout(WAIT):
                while counted("burnt") == 0:  # noqa: ASYNC110 - a control message, later
                    await asyncio.sleep(0.01)
            assert counted("burnt") == 1 and counted("reused") == 0
            assert not agent.closed.done()  # the gateway took the label
    assert [o.result for o in outcomes] == ["burnt"] and authority.enrollments == {"burnt": 1}
    (event,) = read_events(tmp_path / "state" / AUDIT_FILE)
    assert event["EventIdentification"]["EventOutcomeDescription"].startswith("burnt: ")
    assert event["user"] == "alice"
    authority.close()


@pytest.mark.parametrize(
    ("announced", "sent"), [(None, "reused"), ("1", "reused"), ("2", "burnt"), ("x", "reused")]
)
async def test_a_gateway_is_sent_only_the_labels_it_announced(
    tmp_path: Path, announced: str | None, sent: str
) -> None:
    """An older gateway (no x-relay-enroll-results header) closes the agent link on a
    label it does not know: it is sent `reused` for `burnt`, as before."""
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state")
    token_id, secret = burnt_code(authority)
    received: list[str] = []

    class FakeLink:
        def send_control(self, kind: str, body: bytes) -> None:
            assert kind == KIND_ENROLL_RESULT
            received.append(json.loads(body)["result"])

    headers = {"target": "enroll"}
    if announced is not None:
        headers[wire.HEADER_ENROLL_RESULTS] = announced
    pc, agent_end = pipe(headers)
    agent_end.link = FakeLink()  # type: ignore[attr-defined]
    served = asyncio.create_task(authority.serve_enroll(agent_end))
    async with asyncio.timeout(WAIT):
        await read_json(pc)  # the CA
        key = pki.generate_key()
        csr = pki.make_csr(key, Identity.device(site.trust_domain, "main", "ws1"))
        await write_json(
            pc,
            {"v": 1, "token_id": token_id, "secret": encode_secret(secret), "device": "ws1",
             "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(), "password": "pw"},
        )  # fmt: skip
        await pc.write_eof()
        outcome = await served
    assert outcome.result == "burnt" and received == [sent]
    authority.close()


def test_revocations_for_the_gateways(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    (tmp_path / "state").mkdir()
    with DeviceRegistry(tmp_path / "state" / REGISTRY_FILE, site="main") as cli:
        cli.revoke("old", utcnow())
    authority = open_authority(site, tmp_path / "state")
    # A new link gets the full list; a gateway applies it for the agent's site.
    gateway_view = RevocationList("hospital.test")
    assembler = RevocationAssembler()
    for body in authority.revocation_snapshot():
        update = assembler.feed(decode_revocations(body))
        if update is not None:
            gateway_view.apply("main", update)
    assert gateway_view.has_snapshot("main")
    assert gateway_view.is_revoked("spiffe://hospital.test/device/main/old")
    assert authority.poll_revocations() == []  # "old" predates the authority

    with DeviceRegistry(tmp_path / "state" / REGISTRY_FILE, site="main") as cli:
        cli.revoke("ws1", utcnow())  # `relay device revoke ws1` in another process
    (body,) = authority.poll_revocations()
    update = decode_revocations(body)
    assert not update.full and update.devices == ("spiffe://hospital.test/device/main/ws1",)
    assert gateway_view.apply("main", update) == ["spiffe://hospital.test/device/main/ws1"]
    assert authority.poll_revocations() == []
    (in_process,) = authority.revoke("ws2")
    assert decode_revocations(in_process).devices == ("spiffe://hospital.test/device/main/ws2",)
    pushed = [e for e in read_events(tmp_path / "state" / AUDIT_FILE) if e["kind"] == "revocation"]
    assert len(pushed) == 2
    authority.close()


def test_each_revocation_carries_a_notice_the_device_verifies(tmp_path: Path) -> None:
    """Snapshot and increments alike: version 2, a notice per device signed with the site
    CA for that device and its revocation time; a second snapshot signs nothing again."""
    site = make_pki(tmp_path / "pki")
    (tmp_path / "state").mkdir()
    at = utcnow() - timedelta(hours=1)
    with DeviceRegistry(tmp_path / "state" / REGISTRY_FILE, site="main") as cli:
        cli.revoke("old", at)
    authority = open_authority(site, tmp_path / "state")
    old = "spiffe://hospital.test/device/main/old"
    (body,) = authority.revocation_snapshot()
    update = decode_revocations(body)
    assert update.version == 2 and update.devices == (old,)
    keys = [site.ca_cert.public_key()]
    when = verify_notice(update.notices[0], ca_keys=keys, uri=old, not_before=at)
    assert when == at.replace(microsecond=0)
    signed = authority.notices.signed
    assert authority.revocation_snapshot() == [body]  # the cached notice, not a new one
    assert authority.notices.signed == signed == 1

    (pushed,) = authority.revoke("ws2")
    increment = decode_revocations(pushed)
    ws2 = "spiffe://hospital.test/device/main/ws2"
    assert increment.version == 2 and increment.devices == (ws2,)
    row = authority.registry.get_device("ws2")
    assert row is not None and row.revoked_at is not None
    assert verify_notice(increment.notices[0], ca_keys=keys, uri=ws2, not_before=row.revoked_at)
    with pytest.raises(NoticeError):  # bound to its device
        verify_notice(increment.notices[0], ca_keys=keys, uri=old, not_before=at)
    authority.close()


def test_the_notice_cache_is_bounded(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    signer = NoticeSigner(site.ca_key, max_entries=3)
    at = utcnow()
    first = signer.notice("spiffe://hospital.test/device/main/d0", at)
    for i in range(1, 5):
        signer.notice(f"spiffe://hospital.test/device/main/d{i}", at)
    assert len(signer) == 3 and signer.signed == 5
    again = signer.notice("spiffe://hospital.test/device/main/d0", at)  # evicted: signed anew
    assert signer.signed == 6 and again != first  # ECDSA: another, equally valid, signature
    signer.notice("spiffe://hospital.test/device/main/d4", at)
    assert signer.signed == 6


async def test_push_loop_sends_new_revocations(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state")
    sent: asyncio.Queue[list[bytes]] = asyncio.Queue()
    task = asyncio.create_task(authority.run_revocation_push(sent.put_nowait, interval=0.01))
    with DeviceRegistry(tmp_path / "state" / REGISTRY_FILE, site="main") as cli:
        cli.revoke("ws9", utcnow())
    bodies = await asyncio.wait_for(sent.get(), WAIT)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert decode_revocations(bodies[0]).devices == ("spiffe://hospital.test/device/main/ws9",)
    authority.close()


def test_refusal_reports_are_audited(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    authority = open_authority(site, tmp_path / "state")
    refusal = Refusal("revoked", "spiffe://hospital.test/device/main/ws1", "203.0.113.9:4000", 2)
    authority.record_refusal(refusal, reporter="spiffe://hospital.test/gateway/gw1")
    authority.record_refusal(refusal, reporter="gw", rate_limited=40)
    event, folded = read_events(tmp_path / "state" / AUDIT_FILE)
    assert event["kind"] == "auth_refused"
    assert event["EventIdentification"]["EventOutcomeDescription"] == (
        "revoked (2 similar refusals not reported)"
    )
    device, reporter = event["ActiveParticipant"]
    assert device["NetworkAccessPointID"] == "203.0.113.9"
    assert reporter["UserID"] == "spiffe://hospital.test/gateway/gw1"
    assert folded["EventIdentification"]["EventOutcomeDescription"] == (
        "revoked (2 similar refusals not reported) (40 earlier refusals from this gateway"
        " rate-limited, not audited one by one)"
    )
    authority.touch("not a uri")  # ignored, no error
    authority.touch("spiffe://hospital.test/device/other/x")  # other site: ignored
    assert authority.registry.list_devices() == []
    authority.close()
