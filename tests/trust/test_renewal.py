"""Certificate renewal: the 2/3 policy, the exchange both ways, crash-safe files, the loop,
and several renewals over one live TLS link while data flows on it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.agent.audit import AUDIT_FILE, AuditLog, read_events
from relay.agent.audit.budget import AGGREGATE_INTERVAL, SOURCE_BURST
from relay.agent.registry import REGISTRY_FILE, CertificateRow, DeviceRegistry
from relay.agent.renewal import (
    DUE_SLACK,
    MIN_INTERVAL,
    RenewalPace,
    RenewOutcome,
    check_due,
    serve_renew_stream,
)
from relay.agent.signer import RequestRefused, Signer
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, pipe
from relay.net.jsonframes import read_json, write_json
from relay.ops import privatefiles
from relay.proto import LinkSettings
from relay.trust import pki
from relay.trust.identity import Identity, identity_from_certificate
from relay.trust.renewal import (
    PENDING_CA,
    PENDING_CERT,
    PENDING_KEY,
    RenewalError,
    _check_renewed,
    _load_current,
    complete_pending_renewal,
    install,
    next_renewal_time,
    renew,
    renewal_due,
    renewal_loop,
)
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.replacing_helpers import scanner_holds_each_fresh_file_once

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
WS1 = Identity.device("hospital.test", "main", "ws1")
DAY = timedelta(days=1)
WAIT = 10.0


# --- policy ---------------------------------------------------------------------------


def test_due_at_two_thirds_exactly() -> None:
    nb, na = T0, T0 + 30 * DAY
    assert next_renewal_time(nb, na) == T0 + 20 * DAY
    assert not renewal_due(nb, na, T0 + 20 * DAY - timedelta(microseconds=1))
    assert renewal_due(nb, na, T0 + 20 * DAY)
    assert renewal_due(nb, na, na + DAY)  # expired: still due (and renewable over a live link)
    assert not renewal_due(nb, na, nb - DAY)


def test_short_lifetimes() -> None:
    nb, na = T0, T0 + timedelta(seconds=3)
    assert next_renewal_time(nb, na) == T0 + timedelta(seconds=2)
    assert not renewal_due(nb, na, T0 + timedelta(seconds=1.999))
    assert renewal_due(nb, na, T0 + timedelta(seconds=2))


# --- fixtures -------------------------------------------------------------------------


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Site:
    pki: SitePki
    registry: DeviceRegistry
    audit: AuditLog
    identity_dir: Path
    clock: Clock = field(default_factory=Clock)
    lifetime: timedelta = 30 * DAY
    outcomes: list[RenewOutcome] = field(default_factory=list)
    pace: RenewalPace = field(default_factory=RenewalPace)  # the agent's, across streams

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.audit.path)

    async def serve(self, stream: ByteStream, peer: Identity | None = WS1) -> RenewOutcome:
        outcome = await serve_renew_stream(
            stream,
            Signer(
                self.registry,
                self.pki.ca_key,
                self.pki.ca_cert,
                "main",
                self.lifetime,
                self.audit,
                self.clock,
            ),
            peer,
            self.pace,
        )
        self.outcomes.append(outcome)
        return outcome

    def opener(self, device: Identity | None = WS1) -> Any:
        """open_stream for renew(): an in-memory stream whose far end the agent serves,
        for `device` (what the session's inner TLS authenticated)."""

        def open_stream(headers: Mapping[str, str]) -> ByteStream:
            near, far = pipe(headers)
            asyncio.get_running_loop().create_task(self.serve(far, device))
            return near

        return open_stream


def write_identity(
    site: SitePki, directory: Path, name: str, lifetime: timedelta, not_before: datetime = T0
) -> None:
    pair = site.device(name, lifetime=lifetime, not_before=not_before)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(pair.cert, directory / "device.crt")
    shutil.copy(pair.key, directory / "device.key")
    shutil.copy(site.ca, directory / "ca.crt")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = make_pki(tmp_path / "pki")
    write_identity(s, tmp_path / "identity", "ws1", 30 * DAY)
    with DeviceRegistry(tmp_path / REGISTRY_FILE, site="main") as registry:
        yield Site(
            s,
            registry,
            AuditLog(tmp_path / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main"),
            tmp_path / "identity",
        )


def files(directory: Path) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in ("device.crt", "device.key", "ca.crt")}


# --- the exchange ---------------------------------------------------------------------


async def test_not_due_does_nothing(site: Site) -> None:
    before = files(site.identity_dir)
    site.clock.now = T0 + 19 * DAY
    assert not await renew(site.opener(), site.identity_dir, now=site.clock)
    assert files(site.identity_dir) == before and site.outcomes == []


async def test_renewal_replaces_key_and_certificate(site: Site) -> None:
    before = files(site.identity_dir)
    old = pki.load_cert(site.identity_dir / "device.crt")
    site.clock.now = T0 + 20 * DAY
    assert await renew(site.opener(), site.identity_dir, now=site.clock)
    after = files(site.identity_dir)
    assert after["device.key"] != before["device.key"]
    assert after["ca.crt"] == before["ca.crt"]
    cert = pki.load_cert(site.identity_dir / "device.crt")
    key = pki.load_key(site.identity_dir / "device.key")
    assert cert.public_key() == key.public_key()
    assert identity_from_certificate(cert) == identity_from_certificate(old)
    assert cert.not_valid_after_utc == T0 + 20 * DAY + 30 * DAY
    privatefiles.check_private(site.identity_dir / "device.key")
    assert not (site.identity_dir / PENDING_CERT).exists()
    row = site.registry.get_device("ws1")
    assert row is not None and row.serial == format(cert.serial_number, "x")
    (event,) = site.events()
    assert event["kind"] == "renewal"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert event["ActiveParticipant"][0]["UserID"] == "spiffe://hospital.test/device/main/ws1"
    assert [o.result for o in site.outcomes] == ["ok"]


async def expect_refused(site: Site, opener: Any, text: str, result: str) -> None:
    before = files(site.identity_dir)
    site.clock.now = T0 + 25 * DAY
    with pytest.raises(RenewalError, match=text) as info:
        await renew(opener, site.identity_dir, now=site.clock)
    assert "\n" not in str(info.value)
    assert files(site.identity_dir) == before
    await asyncio.sleep(0)
    assert site.outcomes[-1].result == result
    event = site.events()[-1]
    assert event["kind"] == "renewal"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4


async def test_revoked_device_is_refused(site: Site) -> None:
    site.registry.revoke("ws1", T0)
    await expect_refused(site, site.opener(), "this device is revoked", "revoked")


async def test_renewal_needs_a_sealed_session(site: Site) -> None:
    await expect_refused(site, site.opener(device=None), "device's session", "not_device")


@pytest.mark.parametrize(
    "peer",
    [
        Identity.device("hospital.test", "other", "ws1"),
        Identity.device("evil.test", "main", "ws1"),
        Identity.agent("hospital.test", "main"),
    ],
)
async def test_only_devices_of_this_site(site: Site, peer: Identity) -> None:
    await expect_refused(site, site.opener(device=peer), "renewal refused", "not_device")


async def test_csr_for_another_identity_is_refused(site: Site) -> None:
    near, far = pipe(
        {"target": "renew", "x-relay-device": "spiffe://hospital.test/device/main/ws2"}
    )
    task = asyncio.create_task(site.serve(far))  # a header naming ws2 changes nothing
    other = pki.make_csr(pki.generate_key(), Identity.device("hospital.test", "main", "ws2"))
    await write_json(
        near, {"v": 1, "csr_pem": other.public_bytes(serialization.Encoding.PEM).decode()}
    )
    answer = await read_json(near)
    assert answer["status"] == "refused"
    assert "another identity" in str(answer["reason"])
    assert (await task).result == "wrong_identity"
    assert site.registry.get_device("ws2") is None


async def test_oversized_request_is_refused(site: Site) -> None:
    near, far = pipe({"target": "renew"})
    task = asyncio.create_task(site.serve(far))
    await near.write((1 << 20).to_bytes(4, "big"))
    answer = await read_json(near)
    assert answer["status"] == "refused" and "larger than" in str(answer["reason"])
    assert (await task).result == "oversized"


async def test_answer_from_another_ca_is_rejected(site: Site, tmp_path: Path) -> None:
    """A gateway in the path cannot slip in a certificate of its own making."""
    rogue = make_pki(tmp_path / "rogue")
    before = files(site.identity_dir)

    def open_stream(headers: Mapping[str, str]) -> ByteStream:
        near, far = pipe(headers)

        async def forge() -> None:
            request = await read_json(far)
            csr = x509.load_pem_x509_csr(str(request["csr_pem"]).encode())
            ident = Identity.device("hospital.test", "main", "ws1")
            public_key = csr.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            cert = pki.issue_certificate(
                rogue.ca_key, rogue.ca_cert, public_key, ident, 30 * DAY, not_before=site.clock()
            )
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            await write_json(far, {"v": 1, "status": "ok", "cert_pem": pem, "ca_pem": pem})

        asyncio.get_running_loop().create_task(forge())
        return near

    site.clock.now = T0 + 21 * DAY
    with pytest.raises(RenewalError, match="not signed by our CA"):
        await renew(open_stream, site.identity_dir, now=site.clock)
    assert files(site.identity_dir) == before


async def test_no_answer_in_time(site: Site) -> None:
    def open_stream(headers: Mapping[str, str]) -> ByteStream:
        near, _far = pipe(headers)
        return near

    with pytest.raises(RenewalError, match="no renewal answer"):
        await renew(open_stream, site.identity_dir, now=site.clock, force=True, timeout=0.05)


# --- how often one device may renew (the agent's side) ---------------------------------


async def ask(site: Site, peer: Identity = WS1) -> tuple[dict[str, object], RenewOutcome]:
    """One renewal request for `peer` with a fresh key, served by the agent's code."""
    near, far = pipe({"target": "renew"})
    task = asyncio.create_task(site.serve(far, peer))
    csr = pki.make_csr(pki.generate_key(), peer)
    await write_json(
        near, {"v": 1, "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()}
    )
    answer = await read_json(near)
    return answer, await task


def enrolled(site: Site) -> None:
    """Record the device's certificate, as its enrollment did."""
    cert = pki.load_cert(site.identity_dir / "device.crt")
    serial, nb, na = cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
    site.registry.record_certificate("ws1", serial, nb, na, nb)


def results(site: Site) -> list[str]:
    return [o.result for o in site.outcomes]


def renewal_events(site: Site) -> list[dict[str, Any]]:
    return [e for e in site.events() if e["kind"] == "renewal"]


async def test_a_device_renews_only_when_its_newest_certificate_is_due(site: Site) -> None:
    """A flood of renewals from one device: one is signed (and once more later, in case
    its answer was lost), the others are refused with a one-line reason the device logs,
    and the audit trail gets the first SOURCE_BURST refusals, then one aggregate."""
    enrolled(site)
    site.clock.now = T0 + 20 * DAY
    assert await renew(site.opener(), site.identity_dir, now=site.clock)
    held = pki.load_cert(site.identity_dir / "device.crt")
    for _ in range(20):
        answer, outcome = await ask(site)
        assert answer["status"] == "refused" and outcome.result == "too_soon"
        assert "too soon" in str(answer["reason"])
    site.clock.now += MIN_INTERVAL
    assert (await ask(site))[0]["status"] == "ok"  # the one before stands in, once
    site.clock.now += timedelta(hours=1)
    with pytest.raises(RenewalError, match=r"renewal refused: not due: .* is due for renewal"):
        await renew(site.opener(), site.identity_dir, now=site.clock, force=True)
    assert pki.load_cert(site.identity_dir / "device.crt") == held
    row = site.registry.get_device("ws1")
    assert row is not None and row.certificates == 3
    # Due by the device's own schedule (2/3 of its lifetime): renewed again.
    site.clock.now = next_renewal_time(held.not_valid_before_utc, held.not_valid_after_utc)
    assert await renew(site.opener(), site.identity_dir, now=site.clock)
    assert results(site).count("ok") == 3
    outcomes = [e["EventIdentification"]["EventOutcomeIndicator"] for e in renewal_events(site)]
    assert outcomes == [0] + [4] * SOURCE_BURST + [0, 4, 4, 0]
    aggregate = renewal_events(site)[SOURCE_BURST + 2]["aggregate"]
    assert aggregate["count"] == 20 - SOURCE_BURST and aggregate["source"] == WS1.uri


def recorded(serial: str, not_before: datetime, lifetime: timedelta) -> CertificateRow:
    return CertificateRow(serial, not_before, not_before + lifetime, not_before)


@pytest.mark.parametrize("lifetime", [30 * DAY, timedelta(seconds=30)])
def test_due_allows_for_a_device_clock_ahead_of_the_agents(lifetime: timedelta) -> None:
    """Due on the agent: the device's schedule, less DUE_SLACK (a tenth of a short life)."""
    newest = recorded("2", T0, lifetime)
    before = recorded("1", T0 - timedelta(seconds=1), 3 * lifetime)  # not due either
    due = next_renewal_time(newest.not_before, newest.not_after)
    slack = min(DUE_SLACK, lifetime / 10)
    with pytest.raises(RequestRefused, match="not due") as info:
        check_due("ws1", [newest, before], due - slack - timedelta(milliseconds=1), lifetime)
    assert info.value.result == "not_due"
    check_due("ws1", [newest, before], due - slack, lifetime)


async def test_concurrent_renewals_of_one_device_sign_once(site: Site) -> None:
    site.clock.now = T0 + 20 * DAY
    asked = await asyncio.gather(*(ask(site) for _ in range(16)))
    assert sorted(str(a["status"]) for a, _ in asked) == ["ok"] + ["refused"] * 15
    assert {o.result for _, o in asked} - {"ok"} <= {"busy", "too_soon"}
    row = site.registry.get_device("ws1")
    assert row is not None and row.certificates == 1


async def test_a_lost_answer_is_made_up_for_once(site: Site) -> None:
    """The agent signed, but the answer never reached the device (the link dropped): the
    device still holds its due certificate and must get another before it expires,
    after the minimum interval; only once per certificate."""
    enrolled(site)
    site.clock.now = T0 + 20 * DAY
    answer, _ = await ask(site)  # the device never installs it
    assert answer["status"] == "ok"
    site.clock.now += MIN_INTERVAL - timedelta(seconds=1)
    with pytest.raises(RenewalError, match="too soon"):
        await renew(site.opener(), site.identity_dir, now=site.clock)
    site.clock.now += timedelta(seconds=1)
    assert await renew(site.opener(), site.identity_dir, now=site.clock)
    site.clock.now += DAY
    answer, outcome = await ask(site)
    assert answer["status"] == "refused" and outcome.result == "not_due"
    assert results(site).count("ok") == 2


async def test_refusals_are_audited_within_a_budget_per_device(site: Site) -> None:
    """A device that insists fills neither the audit trail nor another device's way, and
    the refusals not written one by one are counted in an aggregate that is written even
    when the device stops (it used to wait for the device's next refusal, for ever)."""
    ws2 = Identity.device("hospital.test", "main", "ws2")
    enrolled(site)
    site.clock.now = T0 + 20 * DAY
    assert (await ask(site))[0]["status"] == "ok"
    first_refusal = site.clock.now + timedelta(seconds=1)
    for _ in range(50):
        site.clock.now += timedelta(seconds=1)
        assert (await ask(site))[0]["status"] == "refused"
    assert (await ask(site, ws2))[0]["status"] == "ok"
    assert (await ask(site, ws2))[0]["status"] == "refused"
    users = [
        (e["ActiveParticipant"][0]["UserID"], e["EventIdentification"]["EventOutcomeIndicator"])
        for e in renewal_events(site)
    ]
    assert users == [(WS1.uri, 0)] + [(WS1.uri, 4)] * SOURCE_BURST + [(ws2.uri, 0), (ws2.uri, 4)]
    site.audit.close()  # at shutdown, before the aggregate is due: written all the same
    last = renewal_events(site)[-1]
    assert last["ActiveParticipant"][0]["UserID"] == WS1.uri
    assert last["aggregate"]["count"] == 50 - SOURCE_BURST
    assert last["aggregate"]["first"] == iso(first_refusal + SOURCE_BURST * timedelta(seconds=1))
    assert last["aggregate"]["last"] == iso(first_refusal + 49 * timedelta(seconds=1))
    assert (
        "aggregated: 40 renewal refusals from " + WS1.uri
        in (last["EventIdentification"]["EventOutcomeDescription"])
    )
    site.audit.close()
    assert len(renewal_events(site)) == len(users) + 1  # written once


async def test_an_aggregate_is_written_when_due_by_the_next_event(site: Site) -> None:
    enrolled(site)
    site.clock.now = T0 + 20 * DAY
    assert (await ask(site))[0]["status"] == "ok"
    for _ in range(SOURCE_BURST + 3):
        assert (await ask(site))[0]["status"] == "refused"
    site.clock.now += AGGREGATE_INTERVAL
    assert (await ask(site))[0]["status"] == "ok"  # the one before stands in, once
    *_, aggregate, ok = renewal_events(site)
    assert aggregate["aggregate"]["count"] == 3
    assert aggregate["EventIdentification"]["EventDateTime"] == iso(site.clock.now)
    assert ok["EventIdentification"]["EventOutcomeIndicator"] == 0


def iso(at: datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_the_pace_lets_one_renewal_of_a_device_run_at_a_time() -> None:
    pace = RenewalPace()
    assert pace.begin("ws1") and not pace.begin("ws1")
    assert pace.begin("ws2")
    pace.end("ws1")
    assert pace.begin("ws1")


# --- a shortened pki.device_lifetime ---------------------------------------------------


async def test_a_shortened_lifetime_is_accepted(site: Site) -> None:
    """IT lowers the lifetime (30 -> 7 days): the due device takes the shorter certificate,
    although it ends before the one it replaces."""
    site.lifetime = 7 * DAY
    site.clock.now = T0 + 20 * DAY
    assert await renew(site.opener(), site.identity_dir, now=site.clock)
    cert = pki.load_cert(site.identity_dir / "device.crt")
    assert cert.not_valid_after_utc == T0 + 27 * DAY
    assert results(site) == ["ok"]


async def test_a_shortened_lifetime_starts_no_storm(site: Site) -> None:
    """The loop renews once at day 20, then on the new certificate's own schedule."""
    enrolled(site)
    site.lifetime = 7 * DAY
    site.clock.now = T0 + 20 * DAY
    renewed: list[datetime] = []
    errors: list[str] = []

    async def fake_sleep(seconds: float) -> None:
        site.clock.now += timedelta(seconds=seconds)
        if len(renewed) == 2 or len(site.outcomes) > 10:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(
            renewal_loop(
                site.opener,
                site.identity_dir,
                now=site.clock,
                sleep=fake_sleep,
                on_renewed=lambda: renewed.append(site.clock()),
                on_error=errors.append,
            ),
            WAIT,
        )
    assert errors == [] and results(site) == ["ok", "ok"]
    assert renewed[0] == T0 + 20 * DAY
    first_end = T0 + 27 * DAY
    assert renewed[1] == next_renewal_time(first_end - 7 * DAY - pki.BACKDATE, first_end)


async def test_a_device_that_refuses_shorter_certificates_costs_the_agent_little(
    site: Site,
) -> None:
    """A device still running the old rule (it threw away any certificate ending before
    its current one) asks every minute: the agent's due rule, by issue time, stops it."""
    enrolled(site)
    site.lifetime = 7 * DAY
    site.clock.now = T0 + 20 * DAY
    while site.clock.now < T0 + 24 * DAY:
        await ask(site)  # its answer is thrown away
        early = site.clock.now < T0 + 20 * DAY + timedelta(hours=1)
        site.clock.now += timedelta(minutes=1 if early else 30)
    assert results(site).count("ok") == 2  # the first, and the stand-in for a lost answer
    row = site.registry.get_device("ws1")
    assert row is not None and row.certificates == 3


def test_the_renewed_certificate_must_not_be_due_already(site: Site) -> None:
    """Valid now and ending later than a third of its own life from now; else the device
    would ask again at once."""
    current = _load_current(site.identity_dir)
    key = pki.generate_key()
    for start, life, ok in ((T0, 30 * DAY, True), (T0 - 20 * DAY, 30 * DAY, False)):
        cert = pki.issue_certificate(
            site.pki.ca_key, site.pki.ca_cert, key.public_key(), WS1, life, not_before=start
        )
        if ok:
            _check_renewed(cert, key, current, T0 + DAY)
        else:
            with pytest.raises(RenewalError, match="due for renewal already"):
                _check_renewed(cert, key, current, T0 + DAY)


# --- crash safety ---------------------------------------------------------------------


def _new_pair(site: Site) -> tuple[Any, x509.Certificate]:
    key = pki.generate_key()
    cert = pki.issue_certificate(
        site.pki.ca_key,
        site.pki.ca_cert,
        key.public_key(),
        Identity.device("hospital.test", "main", "ws1"),
        30 * DAY,
        not_before=T0,
    )
    return key, cert


def test_install_and_recovery_states(site: Site) -> None:
    d = site.identity_dir
    assert complete_pending_renewal(d) is None
    key, cert = _new_pair(site)
    install(d, key, cert)
    assert pki.load_cert(d / "device.crt") == cert and complete_pending_renewal(d) is None

    # Crash after both pending files were written, before any rename.
    key, cert = _new_pair(site)
    pki.write_key(d / PENDING_KEY, key)
    pki.write_cert(d / PENDING_CERT, cert)
    assert complete_pending_renewal(d) == "completed"
    assert pki.load_cert(d / "device.crt") == cert

    # Crash between the two renames: new key in place, old certificate, pending cert.
    key, cert = _new_pair(site)
    pki.write_key(d / "device.key", key)
    pki.write_cert(d / PENDING_CERT, cert)
    assert complete_pending_renewal(d) == "completed"
    assert pki.load_cert(d / "device.crt") == cert

    # Crash while writing the pending certificate: only the pending key exists.
    current = files(d)
    pki.write_key(d / PENDING_KEY, pki.generate_key())
    assert complete_pending_renewal(d) == "discarded"
    assert files(d) == current and not (d / PENDING_KEY).exists()

    # A pending certificate that matches no key is dropped, the current pair kept.
    _, stray = _new_pair(site)
    pki.write_cert(d / PENDING_CERT, stray)
    assert complete_pending_renewal(d) == "discarded"
    assert files(d) == current


def test_install_with_a_ca_and_its_recovery(site: Site, tmp_path: Path) -> None:
    """Enrollment installs ca.crt in the same set (relay enroll --force at another site)."""
    d = site.identity_dir
    other = make_pki(tmp_path / "other")
    key = pki.generate_key()
    cert = pki.issue_certificate(other.ca_key, other.ca_cert, key.public_key(), WS1, 30 * DAY)
    current = files(d)

    # Crash before the certificate was written: the new key and CA are dropped.
    pki.write_key(d / PENDING_KEY, key)
    pki.write_cert(d / PENDING_CA, other.ca_cert)
    assert complete_pending_renewal(d) == "discarded"
    assert files(d) == current and sorted(p.name for p in d.iterdir()) == sorted(current)

    # Crash after the key was renamed: the CA and the certificate follow it.
    pki.write_key(d / "device.key", key)
    pki.write_cert(d / PENDING_CA, other.ca_cert)
    pki.write_cert(d / PENDING_CERT, cert)
    assert complete_pending_renewal(d) == "completed"
    assert pki.load_cert(d / "device.crt") == cert and pki.load_cert(d / "ca.crt") == other.ca_cert

    # A whole install; then a renewal's install (no CA) leaves ca.crt alone.
    install(d, key, cert, other.ca_cert)
    assert sorted(p.name for p in d.iterdir()) == sorted(current)
    key2, cert2 = _new_pair(site)
    pki.write_cert(d / PENDING_CA, site.pki.ca_cert)  # a stray from another attempt
    install(d, key2, cert2)
    assert pki.load_cert(d / "ca.crt") == other.ca_cert and not (d / PENDING_CA).exists()


def test_install_rides_out_a_scanner_holding_the_fresh_files(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: an antivirus scanner opens each freshly written file a moment; renaming it
    then fails once. That was a failed renewal (or enrollment), retried only later."""
    d = site.identity_dir
    other = make_pki(tmp_path / "other")
    key = pki.generate_key()
    cert = pki.issue_certificate(other.ca_key, other.ca_cert, key.public_key(), WS1, 30 * DAY)
    refused = scanner_holds_each_fresh_file_once(monkeypatch)
    install(d, key, cert, other.ca_cert)
    assert pki.load_cert(d / "device.crt") == cert and pki.load_cert(d / "ca.crt") == other.ca_cert
    assert {Path(r).name for r in refused} >= {PENDING_KEY, PENDING_CA, PENDING_CERT}

    key, cert = _new_pair(site)  # and the completion of an interrupted install
    pki.write_key(d / PENDING_KEY, key)
    pki.write_cert(d / PENDING_CERT, cert)
    assert complete_pending_renewal(d) == "completed"
    assert pki.load_cert(d / "device.crt") == cert and not (d / PENDING_CERT).exists()


async def test_renew_completes_an_interrupted_install_first(site: Site) -> None:
    key, cert = _new_pair(site)
    pki.write_key(site.identity_dir / "device.key", key)
    pki.write_cert(site.identity_dir / PENDING_CERT, cert)
    site.clock.now = T0 + DAY
    assert not await renew(site.opener(), site.identity_dir, now=site.clock)
    assert pki.load_cert(site.identity_dir / "device.crt") == cert


# --- the loop -------------------------------------------------------------------------


async def test_loop_renews_again_and_again(site: Site, tmp_path: Path) -> None:
    write_identity(site.pki, site.identity_dir, "ws1", timedelta(seconds=30))
    site.lifetime = timedelta(seconds=30)
    renewed: list[datetime] = []
    errors: list[str] = []
    sleeps: list[float] = []
    linked = iter([False, True, True, True, True, True, True])

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        site.clock.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)

    def opener() -> Any:
        return site.opener() if next(linked, True) else None  # first try: no link yet

    def on_renewed() -> None:
        renewed.append(site.clock())
        if len(renewed) == 3:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(
            renewal_loop(
                opener,
                site.identity_dir,
                now=site.clock,
                sleep=fake_sleep,
                on_renewed=on_renewed,
                on_error=errors.append,
            ),
            WAIT,
        )
    assert len(renewed) == 3 and errors == []
    assert all(s <= 3600 for s in sleeps)
    cert = pki.load_cert(site.identity_dir / "device.crt")
    assert cert.not_valid_after_utc > renewed[-1]
    row = site.registry.get_device("ws1")
    assert row is not None and row.certificates == 3


async def test_loop_reports_refusals_and_retries(site: Site) -> None:
    site.registry.revoke("ws1", T0)
    site.clock.now = T0 + 25 * DAY
    errors: list[str] = []

    async def fake_sleep(seconds: float) -> None:
        site.clock.now += timedelta(seconds=seconds)
        if len(errors) >= 2:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(
            renewal_loop(
                site.opener,
                site.identity_dir,
                now=site.clock,
                sleep=fake_sleep,
                on_error=errors.append,
            ),
            WAIT,
        )
    assert len(errors) >= 2 and all("revoked" in e for e in errors)


# --- over a live TLS link ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def device_server(site: Site) -> AsyncIterator[tuple[int, list[Link]]]:
    """Accepts device links; `renew` streams go to the agent code, others are echoed."""
    sock = socket.create_server((HOST, 0))
    sock.setblocking(False)
    ctx = tls.server_context(site.pki.gateway.cert, site.pki.gateway.key, site.pki.ca)
    links: list[Link] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def echo(stream: Stream) -> None:
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            transport, link = await tls.accept_tls(
                conn,
                ctx,
                lambda: Link(client=False, settings=LinkSettings(), autostart=False),
                handshake_timeout=5.0,
            )
            identity = tls.peer_identity(transport.get_extra_info("ssl_object"))
            assert identity is not None

            def on_stream(stream: Stream, peer: Identity = identity) -> None:
                coro = (
                    site.serve(stream, peer)  # the TLS-authenticated peer, as in a session
                    if stream.headers.get("target") == "renew"
                    else echo(stream)
                )
                task = asyncio.get_running_loop().create_task(coro)
                tasks.add(task)

            link.on_stream = on_stream
            links.append(link)
            link.start()

    acceptor = asyncio.create_task(accept())
    try:
        yield sock.getsockname()[1], links
    finally:
        acceptor.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        sock.close()


async def test_link_survives_several_renewals_while_data_flows(site: Site) -> None:
    """Certificates of 30 s (on a clock the test advances); one link; an echo stream
    carries data throughout; three renewals happen over that same link."""
    # Real time here: the TLS handshake checks the certificate against the real clock.
    site.clock.now = datetime.now(dt.UTC).replace(microsecond=0)
    write_identity(site.pki, site.identity_dir, "ws1", timedelta(seconds=30), site.clock.now)
    site.lifetime = timedelta(seconds=30)
    d = site.identity_dir
    async with device_server(site) as (port, server_links):
        ctx = tls.client_context(d / "device.crt", d / "device.key", d / "ca.crt")
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(
            lambda: Link(client=True, settings=LinkSettings(), name="ws"),
            HOST,
            port,
            ssl=ctx,
            server_hostname=HOST,
        )
        echo = link.open_stream({"target": "tcp:echo"})
        renewed = asyncio.Event()
        count = 0

        async def sleep(seconds: float) -> None:
            site.clock.now += timedelta(seconds=seconds)
            await asyncio.sleep(0.001)

        def on_renewed() -> None:
            nonlocal count
            count += 1
            if count == 3:
                renewed.set()

        loop_task = asyncio.create_task(
            renewal_loop(
                lambda: link.open_stream, d, now=site.clock, sleep=sleep, on_renewed=on_renewed
            )
        )
        sent = received = b""
        i = 0
        async with asyncio.timeout(WAIT):
            while not renewed.is_set() or i < 50:
                chunk = (b"%06d" % i) * 500
                await echo.write(chunk)
                sent += chunk
                while len(received) < len(sent):
                    received += await echo.read()
                i += 1
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await echo.write_eof()
        assert await echo.read() == b""
        assert received == sent
        assert count >= 3
        assert not link.closed.done() and len(server_links) == 1  # one link all along
        # The agent may have answered one more that the cancelled loop did not install.
        assert count <= [o.result for o in site.outcomes].count("ok") <= count + 1
        assert all(o.ok for o in site.outcomes)
        link.close()
        await asyncio.wait_for(link.wait_closed(), WAIT)
    # The files now hold the latest identity, usable for the next dial.
    cert = pki.load_cert(d / "device.crt")
    assert cert.not_valid_after_utc > site.clock() - timedelta(seconds=30)
    tls.client_context(d / "device.crt", d / "device.key", d / "ca.crt")
