"""A gateway's REVOKED against a real workstation: heeded only with the agent's notice.

The real gateway in-process, an agent-shaped link that sends it whatever "revoke" list a
test chooses (as a compromised gateway could make up), and the real workstation with its
study cache on disk. A genuine notice wipes the cache and ends the run with exit 3; a
forged one (none, another device's, another CA's, an old one) leaves the cache intact
and the workstation dialling again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from relay import wire
from relay.net import tls
from relay.net.aio import Link
from relay.net.dialer import dial
from relay.ops.config import Address, ConfigError
from relay.seal.core import SealCore
from relay.seal.policy import ALPN_SESSION, agent_check, device_check, session_server_context
from relay.trust import pki
from relay.trust.identity import Identity
from relay.trust.notice import sign_notice
from relay.trust.revocation import KIND_REVOKE, encode_revocations
from relay.workstation.cache.settings import CacheConfig
from relay.workstation.cache.store import CachedInstance
from relay.workstation.config import DicomNodeConfig
from relay.workstation.revocation import MARKER_FILE, record_revoked
from relay.workstation.service import EXIT_REVOKED, REVOKED_MESSAGE, Workstation, run_workstation
from tests.ends_helpers import (
    LIMITS,
    WAIT,
    GatewayHandle,
    device_identity_dir,
    running_gateway,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import HOST, Pair, SitePki, make_pki

STUDY = "1.2.826.0.1.3680043.10.1341.777"
RELAY = [sys.executable, "-m", "relay.cli"]
ROOT = Path(__file__).resolve().parents[2]
DATA = b"DOE^CANARY " * 100


def device_uri(site: SitePki, name: str) -> str:
    return Identity.device(site.trust_domain, site.site, name).uri


@contextlib.asynccontextmanager
async def agent_link(site: SitePki, gw: GatewayHandle) -> AsyncIterator[Link]:
    """An agent-shaped link that announces an empty list (so the site is routed)."""
    ctx = tls.client_context(site.agent.cert, site.agent.key, site.ca, wire.ALPN_AGENT)
    link = await dial(
        Address(HOST, gw.port), ctx, LIMITS, alpn=wire.ALPN_AGENT, name="agent", timeout=WAIT
    )
    for body in encode_revocations((), full=True):
        link.send_control(KIND_REVOKE, body)
    try:
        yield link
    finally:
        link.close()


def send(link: Link, devices: dict[str, str | None]) -> None:
    """An incremental list: with notices (version 2) unless one is None (version 1)."""
    if any(n is None for n in devices.values()):
        bodies = encode_revocations(devices, full=False)
    else:
        notices = {uri: n for uri, n in devices.items() if n is not None}
        bodies = encode_revocations(devices, full=False, notices=notices)
    for body in bodies:
        link.send_control(KIND_REVOKE, body)


@contextlib.asynccontextmanager
async def workstation_with_a_study(
    site: SitePki, tmp: Path, gw: GatewayHandle
) -> AsyncIterator[tuple[Workstation, asyncio.Task[int]]]:
    """The workstation (DICOM node on, so its cache is too) with one study cached."""
    config = dataclasses.replace(
        workstation_config(device_identity_dir(site, tmp), tmp, gw.port),
        dicom=DicomNodeConfig(Address(HOST, 0), "RELAY"),
        cache=CacheConfig(dir=tmp / "cache"),
    )
    stop = asyncio.Event()
    started: asyncio.Future[Workstation] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_workstation(config, stop=stop, started=started.set_result, handle_signals=False)
    )
    ws = await asyncio.wait_for(started, WAIT)
    try:
        assert ws.cache is not None
        store = ws.cache.store
        store.begin(STUDY, {"PatientName": "DOE^CANARY"}, 1, "test")
        inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.1", f"{STUDY}.9",
                              "1.2.840.10008.1.2.1", 0)  # fmt: skip
        store.put(STUDY, inst, DATA)
        store.finish(STUDY, complete=True)
        await asyncio.wait_for(ws.kept.up.wait(), WAIT)
        yield ws, task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def cached_files(tmp: Path) -> list[Path]:
    return [p for p in (tmp / "cache").rglob("*") if p.is_file()]


async def test_a_genuine_notice_wipes_the_cache_and_ends_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_pki(tmp_path / "pki")
    async with (
        running_gateway(site, tmp_path) as gw,
        agent_link(site, gw) as agent,
        workstation_with_a_study(site, tmp_path, gw) as (ws, task),
    ):
        assert cached_files(tmp_path)
        uri = device_uri(site, "ws1")
        send(agent, {uri: sign_notice(site.ca_key, uri, datetime.now(UTC))})
        assert await asyncio.wait_for(task, WAIT) == EXIT_REVOKED
        # The run ended only once the wipe (in a worker thread) was done.
        assert ws.revoked.is_set() and cached_files(tmp_path) == []
        assert ws.kept.stats.unheeded_revocations == 0
    assert REVOKED_MESSAGE in caplog.text
    assert "cache wiped (revoked): 1 studies" in caplog.text


FORGERIES = ["no notice", "another device's", "another CA's", "an old one", "garbage"]


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_revocation_leaves_the_workstation_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, forgery: str
) -> None:
    """What a compromised gateway can make up: nothing wiped, no exit, one warning with
    the reason, and the workstation dials again (and is told again) after its backoff."""
    site = make_pki(tmp_path / "pki")
    uri = device_uri(site, "ws1")
    now = datetime.now(UTC)
    notices: dict[str, str | None] = {
        "no notice": None,
        "another device's": sign_notice(site.ca_key, device_uri(site, "ws2"), now),
        "another CA's": sign_notice(make_pki(tmp_path / "other").ca_key, uri, now),
        # a revocation before this certificate (a device enrolled again since)
        "an old one": sign_notice(site.ca_key, uri, now - timedelta(days=1)),
        "garbage": "rn1.not-a-notice",
    }
    caplog.set_level(logging.WARNING)
    async with (
        running_gateway(site, tmp_path) as gw,
        agent_link(site, gw) as agent,
        workstation_with_a_study(site, tmp_path, gw) as (ws, task),
    ):
        before = cached_files(tmp_path)
        assert before
        send(agent, {uri: notices[forgery]})
        await wait_until(lambda: ws.kept.stats.unheeded_revocations >= 3)
        assert not task.done() and not ws.revoked.is_set() and ws.kept.revoked is None
        assert cached_files(tmp_path) == before
        assert ws.cache is not None and STUDY in ws.cache.store.studies
        # The agent lets it in again: the link comes back up, nothing was lost.
        for body in encode_revocations((), full=True):
            agent.send_control(KIND_REVOKE, body)
        await wait_until(lambda: ws.kept.up.is_set() and ws.kept.link is not None)
    warnings = [r for r in caplog.records if r.getMessage().startswith("the gateway says")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    why = warnings[0].__dict__["why"]
    assert why.startswith("the gateway's")
    assert "CANARY" not in caplog.text and STUDY not in caplog.text
    assert REVOKED_MESSAGE not in caplog.text
    assert "cache wiped" not in caplog.text


async def renewed(ws: Workstation) -> None:
    """A renewal's files are in place: its contexts built (in their thread), swapped in."""
    ws._renewed()
    await asyncio.gather(*ws._renewed_loads)


async def test_a_renewed_certificate_moves_the_bar(tmp_path: Path) -> None:
    """After a renewal (or reload) the check uses the new certificate's notBefore."""
    site = make_pki(tmp_path / "pki")
    identity = device_identity_dir(site, tmp_path)
    config = workstation_config(identity, tmp_path, 1)
    ws = Workstation(config)
    uri = device_uri(site, "ws1")
    start = pki.load_cert(identity / "device.crt").not_valid_before_utc
    between = sign_notice(site.ca_key, uri, start + timedelta(minutes=30))
    reason = f"this device was revoked; enroll it again {between}"
    assert ws._check_revoked(reason) is None
    later = site.device("ws1", not_before=start + timedelta(hours=1))  # the renewed one
    (identity / "device.crt").write_bytes(later.cert.read_bytes())
    (identity / "device.key").write_bytes(later.key.read_bytes())
    await renewed(ws)
    why = ws._check_revoked(reason)
    assert why is not None and "predates" in why


def handshakes(gw: GatewayHandle) -> float:
    """Every TLS handshake the gateway saw, whatever its result."""
    return sum(
        sample.value
        for family in gw.server.metrics.registry.collect()
        if family.name == "relay_handshakes"
        for sample in family.samples
        if sample.name == "relay_handshakes_total"
    )


async def test_a_revoked_workstation_restarted_exits_3_at_once_without_dialling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """launchd and Task Scheduler restart it whatever its status: the revocation is
    recorded in state_dir, and `relay workstation` (a real process) with the same
    certificate exits 3 with one line, before the gateway sees any handshake."""
    site = make_pki(tmp_path / "pki")
    identity = device_identity_dir(site, tmp_path)
    state = tmp_path / "state"
    async with running_gateway(site, tmp_path) as gw, agent_link(site, gw) as agent:
        config = dataclasses.replace(
            workstation_config(identity, tmp_path, gw.port), state_dir=state
        )
        task = asyncio.create_task(run_workstation(config, handle_signals=False))
        await wait_until(lambda: handshakes(gw) >= 2)  # the agent's link and ours
        uri = device_uri(site, "ws1")
        send(agent, {uri: sign_notice(site.ca_key, uri, datetime.now(UTC))})
        assert await asyncio.wait_for(task, WAIT) == EXIT_REVOKED
        marker = json.loads((state / MARKER_FILE).read_text())
        cert = pki.load_cert(identity / "device.crt")
        assert marker["certificate_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
        assert set(marker) == {"certificate_sha256", "serial", "revoked_at"}  # nothing else

        yaml_file = tmp_path / "workstation.yaml"
        yaml_file.write_text(
            f"gateway: {HOST}:{gw.port}\nidentity_dir: {identity.as_posix()}\n"
            f"state_dir: {state.as_posix()}\nlog_level: info\n"
        )
        before = handshakes(gw)
        proc = await asyncio.create_subprocess_exec(
            *RELAY, "workstation", "--config", str(yaml_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == EXIT_REVOKED, out.decode()
        lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        said = [e["msg"] for e in lines]
        assert said[-1].startswith(f"this device was revoked at {marker['revoked_at']}"), said
        assert "workstation started" not in said
        assert not any(e.get("event") == "listening" for e in lines), said
        await asyncio.sleep(0.5)  # a dial would have reached the gateway by now
        assert handshakes(gw) == before


async def test_a_new_enrollment_is_not_stopped_by_the_old_marker(tmp_path: Path) -> None:
    """Enrolled again: another certificate, so the marker no longer matches; it is
    removed and the workstation starts and links."""
    site = make_pki(tmp_path / "pki")
    identity = device_identity_dir(site, tmp_path)
    state = tmp_path / "state"
    record_revoked(state, identity / "device.crt")
    identity = device_identity_dir(site, tmp_path)  # the new enrollment: a new pair
    async with running_gateway(site, tmp_path) as gw:
        config = dataclasses.replace(
            workstation_config(identity, tmp_path, gw.port), state_dir=state
        )
        stop = asyncio.Event()
        started: asyncio.Future[Workstation] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_workstation(config, stop=stop, started=started.set_result, handle_signals=False)
        )
        ws = await asyncio.wait_for(started, WAIT)
        await asyncio.wait_for(ws.kept.up.wait(), WAIT)
        assert not (state / MARKER_FILE).exists()
        stop.set()
        assert await asyncio.wait_for(task, WAIT) == 0


@pytest.mark.parametrize("kind", ["state_dir_is_a_file", "marker_is_a_directory"])
def test_a_state_dir_that_cannot_be_read_is_one_config_line(tmp_path: Path, kind: str) -> None:
    """A state_dir that is a file (or a marker that is a directory) is the operator's to
    fix: one line naming state_dir and the path, not a NotADirectoryError's traceback."""
    site = make_pki(tmp_path / "pki")
    identity = device_identity_dir(site, tmp_path)
    state = tmp_path / "state"
    if kind == "state_dir_is_a_file":
        state.write_text("not a directory")
    else:
        (state / MARKER_FILE).mkdir(parents=True)
    config = dataclasses.replace(workstation_config(identity, tmp_path, 1), state_dir=state)
    with pytest.raises(ConfigError) as raised:
        Workstation(config).revoked_at_start()
    assert raised.value.key == "state_dir"
    assert str(state) in str(raised.value)


def _legacy_ca(trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA made before CAs named their site: its one URI SAN is `spiffe://TD`."""
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _open_session(ctx: ssl.SSLContext, agent: Pair, site: SitePki) -> SealCore:
    """The workstation's end of one sealed handshake (in memory) with `agent`, which
    trusts `site`'s CA for the device: a gateway carrying the session to whoever it likes."""
    server = SealCore(
        session_server_context(agent.cert, agent.key, site.ca),
        server_side=True,
        alpn=ALPN_SESSION,
        check_peer=device_check(site.trust_domain, site.site),
    )
    client = SealCore(
        ctx, server_side=False, alpn=ALPN_SESSION, check_peer=agent_check(site.trust_domain, "main")
    )
    for _ in range(20):
        up = client.data_to_send()
        if up:
            server.receive_data(up)
        down = server.data_to_send()
        if down:
            client.receive_data(down)
        if not up and not down:
            break
    return client


async def test_only_the_sites_own_ca_speaks_for_its_agent_and_its_notices(tmp_path: Path) -> None:
    """ca.crt may hold other CAs than the site's (another site's, that issued a shared
    gateway's certificate; a legacy one). None of them may vouch for our agent in the
    sealed session (north's CA minting `agent/main`, carried there by a compromised
    gateway, read the session and could send a sealed REVOKED: it was taken before), nor
    sign a revocation notice for us (the legacy CA's was heeded). At start, after a
    renewal alike; the site's own CA still does both."""
    site = make_pki(tmp_path / "pki")
    north = make_pki(tmp_path / "north", site="north")
    legacy_key, legacy_ca = _legacy_ca(site.trust_domain)
    identity = device_identity_dir(site, tmp_path)
    ca = identity / "ca.crt"
    legacy_pem = legacy_ca.public_bytes(Encoding.PEM)
    ca.write_bytes(site.ca.read_bytes() + north.ca.read_bytes() + legacy_pem)
    impostor = north.issue("impostor", Identity.agent(site.trust_domain, "main"))
    old_style = Pair(tmp_path / "old-agent.crt", tmp_path / "old-agent.key")
    old_key = pki.generate_key()
    old_cert = pki.issue_certificate(
        legacy_key, legacy_ca, old_key.public_key(), Identity.agent(site.trust_domain, "main"),
        timedelta(days=1),
    )  # fmt: skip
    pki.write_key(old_style.key, old_key)
    pki.write_cert(old_style.cert, old_cert)
    uri = device_uri(site, "ws1")
    start = pki.load_cert(identity / "device.crt").not_valid_before_utc
    at = start + timedelta(minutes=1)
    forged = f"this device was revoked; enroll it again {sign_notice(legacy_key, uri, at)}"
    genuine = f"this device was revoked; enroll it again {sign_notice(site.ca_key, uri, at)}"

    ws = Workstation(workstation_config(identity, tmp_path, 1))

    def check() -> None:
        for agent in (impostor, old_style):
            refused = _open_session(ws.session.ctx, agent, site)
            assert refused.failure is not None and refused.failure.reason == "unknown_ca"
        assert _open_session(ws.session.ctx, site.agent, site).state == "open"
        why = ws._check_revoked(forged)
        assert why is not None and "not signed by this site's CA" in why
        assert ws._check_revoked(genuine) is None

    check()
    await renewed(ws)  # a reload builds both the same way
    check()
