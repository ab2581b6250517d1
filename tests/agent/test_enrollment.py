"""The agent's side of enrollment, over an in-memory stream: every bad case of issue 4."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.agent import enrollment
from relay.agent.audit import AUDIT_FILE, MAX_LINE_BYTES, AuditLog, read_events
from relay.agent.audit.budget import (
    AGGREGATE_INTERVAL,
    KIND_BURST,
    MAX_AGGREGATES,
    SOURCE_BURST,
    SOURCE_REFILL,
)
from relay.agent.directory import Directory, DirectoryUser, Refusal
from relay.agent.enrollment import (
    BURNT_MESSAGE,
    MAX_REQUEST,
    REFUSAL_LINES_TOTAL,
    EnrollOutcome,
    serve_enroll_stream,
)
from relay.agent.registry import MAX_PASSWORD_FAILURES, REGISTRY_FILE, DeviceRegistry
from relay.agent.signer import Signer
from relay.net.bytestream import ByteStream, pipe
from relay.net.jsonframes import encode_json, read_json, write_json
from relay.ops.loglimit import LOG_BURST, LogLimiter
from relay.trust import pki
from relay.trust.codes import encode_secret
from relay.trust.identity import Identity, identity_from_certificate
from relay.trust.revocation import ENROLL_RESULTS
from tests.agent.directory.conftest import directory_section, read_settings
from tests.agent.directory.fakeldap import FakeLdap
from tests.interop.harness.slapd import PASSWORDS, Slapd, start_slapd
from tests.pki_helpers import SitePki, make_pki

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
WAIT = 10.0


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Agent:
    site: SitePki
    registry: DeviceRegistry
    audit: AuditLog
    clock: Clock = field(default_factory=Clock)

    def token(self, device: str = "ws1", ttl: timedelta = timedelta(hours=24)) -> tuple[str, bytes]:
        return self.registry.create_token(device, ttl, self.clock())

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.audit.path)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    site = make_pki(tmp_path / "pki")
    with DeviceRegistry(tmp_path / REGISTRY_FILE, site="main") as registry:
        audit = AuditLog(
            tmp_path / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main", site="main"
        )
        yield Agent(site, registry, audit)


def identity(name: str = "ws1", site: str = "main", td: str = "hospital.test") -> Identity:
    return Identity.device(td, site, name)


def csr_pem(key: Any, ident: Identity) -> str:
    return pki.make_csr(key, ident).public_bytes(serialization.Encoding.PEM).decode()


async def serve(agent: Agent, stream: ByteStream, **kwargs: Any) -> EnrollOutcome:
    return await serve_enroll_stream(
        stream,
        Signer(
            agent.registry,
            agent.site.ca_key,
            agent.site.ca_cert,
            "main",
            timedelta(days=30),
            agent.audit,
            agent.clock,
        ),
        **kwargs,
    )


async def exchange(
    agent: Agent,
    request: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[EnrollOutcome, dict[str, Any] | None]:
    """Play the PC: read the CA, send `request` (a message, or raw bytes), read the answer."""
    pc, agent_end = pipe({"target": "enroll", "x-relay-peer": "203.0.113.9", **(headers or {})})
    task = asyncio.create_task(serve(agent, agent_end, **kwargs))
    answer: dict[str, Any] | None = None
    async with asyncio.timeout(WAIT):
        hello = await read_json(pc)
        assert (
            hello["ca_pem"] == agent.site.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
        )
        if isinstance(request, bytes):
            await pc.write(request)
        else:
            await write_json(pc, request, limit=1 << 20)
        await pc.write_eof()
        answer = await read_json(pc)
        assert await pc.read() == b""  # the agent closed its side
        outcome = await task
    return outcome, answer


def request(
    token: tuple[str, bytes], device: str = "ws1", csr_for: Identity | None = None, key: Any = None
) -> dict[str, Any]:
    return {
        "v": 1,
        "token_id": token[0],
        "secret": encode_secret(token[1]),
        "device": device,
        "csr_pem": csr_pem(key or pki.generate_key(), csr_for or identity(device)),
    }


def assert_refused(
    agent: Agent, outcome: EnrollOutcome, answer: dict[str, Any] | None, result: str, text: str
) -> None:
    assert outcome.result == result and result in ENROLL_RESULTS
    assert answer is not None and answer["status"] == "refused"
    reason = answer["reason"]
    assert text in reason and "\n" not in reason and len(reason) < 300
    event = agent.events()[-1]
    assert event["kind"] == "enrollment"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert event["EventIdentification"]["EventOutcomeDescription"].startswith(result)
    assert event["ActiveParticipant"][0]["NetworkAccessPointID"] == "203.0.113.9"


async def test_enrollment_signs_records_and_audits(agent: Agent) -> None:
    token = agent.token()
    key = pki.generate_key()
    outcome, answer = await exchange(agent, request(token, key=key))
    assert outcome.ok and outcome.device == identity().uri
    assert answer is not None and answer["status"] == "ok"
    cert = x509.load_pem_x509_certificate(answer["cert_pem"].encode())
    cert.verify_directly_issued_by(agent.site.ca_cert)
    assert identity_from_certificate(cert) == identity()
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == T0 - pki.BACKDATE
    assert cert.not_valid_after_utc == T0 + timedelta(days=30)
    row = agent.registry.get_device("ws1")
    assert row is not None and row.serial == format(cert.serial_number, "x")
    assert row.enrolled_at == T0
    event = agent.events()[-1]
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert event["ActiveParticipant"][0]["UserID"] == identity().uri
    assert event["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == row.serial


async def test_reused_code(agent: Agent) -> None:
    token = agent.token()
    first, _ = await exchange(agent, request(token))
    assert first.ok
    outcome, answer = await exchange(agent, request(token))
    assert_refused(agent, outcome, answer, "reused", "already used")


async def test_expired_code(agent: Agent) -> None:
    token = agent.token(ttl=timedelta(hours=1))
    agent.clock.now = T0 + timedelta(hours=1)
    outcome, answer = await exchange(agent, request(token))
    assert_refused(agent, outcome, answer, "expired", "expired at 2030-01-01T13:00:00")


async def test_forged_code(agent: Agent) -> None:
    token_id, _ = agent.token()
    outcome, answer = await exchange(agent, request((token_id, b"\x01" * 20)))
    assert_refused(agent, outcome, answer, "forged", "not valid")


async def test_unknown_code(agent: Agent) -> None:
    outcome, answer = await exchange(agent, request(("0" * 16, b"\x01" * 20)))
    assert_refused(agent, outcome, answer, "unknown", "unknown enrollment code")


async def test_code_for_another_device_name(agent: Agent) -> None:
    token = agent.token("ws1")
    outcome, answer = await exchange(agent, request(token, device="ws2"))
    assert_refused(agent, outcome, answer, "wrong_device", "issued for device 'ws1', not 'ws2'")
    retry, _ = await exchange(agent, request(token))  # the code was not spent
    assert retry.ok


@pytest.mark.parametrize(
    "asked",
    [identity("ws2"), identity("ws1", site="other"), identity("ws1", td="evil.test")],
)
async def test_csr_asking_for_another_identity(agent: Agent, asked: Identity) -> None:
    token = agent.token()
    outcome, answer = await exchange(agent, request(token, csr_for=asked))
    assert_refused(agent, outcome, answer, "wrong_identity", "CSR asks for another identity")
    assert answer is not None and asked.uri in answer["reason"]
    assert agent.registry.get_device("ws1") is None  # nothing issued
    retry, _ = await exchange(agent, request(token))
    assert retry.ok


async def test_csr_without_identity(agent: Agent) -> None:
    key = pki.generate_key()
    bare = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws1")]))
        .sign(key, hashes.SHA256())
    )
    req = request(agent.token())
    req["csr_pem"] = bare.public_bytes(serialization.Encoding.PEM).decode()
    outcome, answer = await exchange(agent, req)
    assert_refused(agent, outcome, answer, "wrong_identity", "(none, expected")


async def test_oversized_request_is_refused_from_its_header(agent: Agent) -> None:
    token = agent.token()
    # Only the length header: the agent must refuse without waiting for the body.
    outcome, answer = await exchange(agent, struct.pack(">I", MAX_REQUEST + 1))
    assert_refused(agent, outcome, answer, "oversized", "larger than 16384 bytes")
    big = request(token)
    big["csr_pem"] += " " * MAX_REQUEST
    outcome, answer = await exchange(agent, big)
    assert_refused(agent, outcome, answer, "oversized", "larger than")


@pytest.mark.parametrize(
    ("mutate", "result", "text"),
    [
        (lambda r: r.update(csr_pem="garbage"), "bad_csr", "malformed CSR"),
        (lambda r: r.update(csr_pem=""), "malformed", "no CSR"),
        (lambda r: r.update(csr_pem=1), "malformed", "no CSR"),
        (lambda r: r.update(csr_pem="x" * 9000), "bad_csr", "larger than"),
        (lambda r: r.pop("device"), "malformed", "'device'"),
        (lambda r: r.update(device="bad name"), "malformed", "invalid device name"),
        (lambda r: r.update(secret="!!"), "malformed", "malformed secret"),
        (lambda r: r.update(token_id="nope"), "malformed", "malformed token id"),
        (lambda r: r.update(v=2), "malformed", "version"),
    ],
)
async def test_malformed_requests(agent: Agent, mutate: Any, result: str, text: str) -> None:
    req = request(agent.token())
    mutate(req)
    outcome, answer = await exchange(agent, req)
    assert_refused(agent, outcome, answer, result, text)


async def test_not_json(agent: Agent) -> None:
    body = b"{not json"
    outcome, answer = await exchange(agent, struct.pack(">I", len(body)) + body)
    assert_refused(agent, outcome, answer, "malformed", "not UTF-8 JSON")


async def test_csr_with_a_bad_signature(agent: Agent) -> None:
    req = request(agent.token())
    other = request(agent.token(), key=pki.generate_key())
    csr = x509.load_pem_x509_csr(req["csr_pem"].encode())
    other_csr = x509.load_pem_x509_csr(other["csr_pem"].encode())
    # Same request info, another key's signature: well formed, but not self-signed.
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    sig, other_sig = csr.signature, other_csr.signature
    if len(sig) == len(other_sig):
        i = bytes(der).rindex(sig)
        der[i : i + len(sig)] = other_sig
    else:
        der[-5] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    req["csr_pem"] = tampered.public_bytes(serialization.Encoding.PEM).decode()
    outcome, answer = await exchange(agent, req)
    assert outcome.result == "bad_csr"
    assert answer is not None and ("signature" in answer["reason"] or "CSR" in answer["reason"])


async def test_csr_with_another_curve(agent: Agent) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    req = request(agent.token())
    req["csr_pem"] = csr_pem(key, identity())
    outcome, answer = await exchange(agent, req)
    assert_refused(agent, outcome, answer, "bad_csr", "P-256")


async def test_silent_pc_times_out(agent: Agent) -> None:
    pc, agent_end = pipe({"target": "enroll"})
    outcome = await serve(agent, agent_end, timeout=0.05)
    assert outcome.result == "timeout"
    assert agent.events()[-1]["EventIdentification"]["EventOutcomeIndicator"] == 4
    with pytest.raises(Exception, match="reset"):
        while await pc.read():
            pass


async def test_pc_that_aborts(agent: Agent) -> None:
    pc, agent_end = pipe({"target": "enroll"})
    task = asyncio.create_task(serve(agent, agent_end))
    await read_json(pc)
    await pc.write(encode_json({"v": 1})[:3])
    pc.reset(7)
    outcome = await asyncio.wait_for(task, WAIT)
    assert outcome.result == "aborted"


async def test_registry_that_cannot_be_written(tmp_path: Path) -> None:
    """Another process holds the registry's write lock: the PC is told to try again, and
    the audit records a serious failure (the agent's fault, not the PC's)."""
    site = make_pki(tmp_path / "pki")
    path = tmp_path / REGISTRY_FILE
    with DeviceRegistry(path, site="main", busy_timeout=0.2) as registry:
        audit = AuditLog(
            tmp_path / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main", site="main"
        )
        agent = Agent(site, registry, audit)
        token = agent.token()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            outcome, answer = await exchange(agent, request(token))
        finally:
            other.close()
        assert outcome.result == "internal"
        assert answer is not None and answer["status"] == "refused"
        assert "try again" in answer["reason"] and str(path) not in answer["reason"]
        event = agent.events()[-1]
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 8
        assert event["EventIdentification"]["EventOutcomeDescription"].startswith("internal")
        assert registry.redeem_token(token[0], token[1], "ws1", agent.clock()).ok  # unspent


async def test_a_code_never_moves_an_enrolled_device_to_another_user(
    agent: Agent, tmp_path: Path
) -> None:
    """Two codes for one new name, for two users: the first enrollment takes the name,
    and the other code cannot bind the device to its user afterwards (nothing signed,
    the code not spent, the device still the first user's)."""
    server = start_slapd(tmp_path / "slapd")
    directory = Directory(read_settings(directory_section(server, tmp_path), tmp_path))
    try:
        now = agent.clock()
        daves = agent.registry.create_token("ws1", timedelta(hours=24), now, user="dave")
        alices = agent.registry.create_token("ws1", timedelta(hours=24), now, user="alice")
        first, _ = await exchange(
            agent, {**request(alices), "password": PASSWORDS["alice"]}, directory=directory
        )
        assert first.ok and agent.registry.device_user("ws1") == "alice"
        outcome, answer = await exchange(
            agent, {**request(daves), "password": PASSWORDS["dave"]}, directory=directory
        )
        assert outcome.result == "wrong_device" and answer is not None
        assert answer["status"] == "refused" and "another user" in answer["reason"]
        assert agent.registry.device_user("ws1") == "alice"
        row = agent.registry.get_device("ws1")
        assert row is not None and row.certificates == 1
        (used,) = agent.registry._db.execute(
            "SELECT used_at FROM tokens WHERE id = ?", (daves[0],)
        ).fetchone()
        assert used is None
    finally:
        directory.close()
        server.close()


class CountingDirectory(Directory):
    """The real directory, counting the binds asked of it (each one a guess, and a step
    towards the user's lockout in Active Directory)."""

    binds = 0

    async def authenticate(
        self, user: str, password: str, *, admin: bool = False
    ) -> DirectoryUser | Refusal:
        self.binds += 1
        return await super().authenticate(user, password, admin=admin)


@pytest.fixture
def directory(slapd: Slapd, tmp_path: Path) -> Iterator[CountingDirectory]:
    counting = CountingDirectory(
        read_settings(directory_section(slapd, tmp_path, timeout="2s"), tmp_path)
    )
    yield counting
    counting.close()


BURNT = BURNT_MESSAGE


def with_password(token: tuple[str, bytes], password: str) -> dict[str, Any]:
    return {**request(token), "password": password}


def user_token(agent: Agent, user: str) -> tuple[str, bytes]:
    return agent.registry.create_token("ws1", timedelta(hours=24), agent.clock(), user=user)


async def test_wrong_passwords_burn_a_code_bound_to_a_user(
    agent: Agent, directory: CountingDirectory
) -> None:
    """Whoever holds a code (an intercepted e-mail, a photo of the QR) gets a few
    guesses at its user's password, not an oracle: the code burns, audited as such."""
    token = user_token(agent, "carol")
    for _ in range(MAX_PASSWORD_FAILURES - 1):
        outcome, answer = await exchange(agent, with_password(token, "guess"), directory=directory)
        assert_refused(agent, outcome, answer, "wrong_password", "wrong password")
    outcome, answer = await exchange(agent, with_password(token, "guess"), directory=directory)
    assert outcome.result == "wrong_password"
    assert answer is not None and answer["reason"] == BURNT
    event = agent.events()[-1]
    assert event["user"] == "carol"
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 12
    assert "burnt" in event["EventIdentification"]["EventOutcomeDescription"]
    assert directory.binds == MAX_PASSWORD_FAILURES
    # The right password comes too late, and the directory is not asked again. The
    # attempt is a `burnt` of its own (it used to be counted as a used code, `reused`).
    for password in (PASSWORDS["carol"], "guess"):
        outcome, answer = await exchange(agent, with_password(token, password), directory=directory)
        assert_refused(agent, outcome, answer, "burnt", BURNT)
        assert "no longer be used" in BURNT and "too many wrong passwords" in BURNT
        assert "ask IT for a new one" in BURNT
        description = agent.events()[-1]["EventIdentification"]["EventOutcomeDescription"]
        assert description == f"burnt: user carol: {BURNT}"
    assert directory.binds == MAX_PASSWORD_FAILURES
    assert agent.registry.get_device("ws1") is None


async def test_concurrent_guesses_ask_the_directory_at_most_the_limit(
    agent: Agent, directory: CountingDirectory
) -> None:
    """Many attempts at once on one code: each is counted before its bind, so they
    cannot all pass the check while the first binds are still under way."""
    token = user_token(agent, "carol")
    attempts = 3 * MAX_PASSWORD_FAILURES
    results = await asyncio.gather(
        *(
            exchange(agent, with_password(token, f"guess{i}"), directory=directory)
            for i in range(attempts)
        )
    )
    assert directory.binds <= MAX_PASSWORD_FAILURES
    reasons = [answer["reason"] for _, answer in results if answer is not None]
    assert len(reasons) == attempts
    assert set(reasons) == {"wrong password", BURNT}
    assert reasons.count("wrong password") < MAX_PASSWORD_FAILURES
    burnt = [e for e in agent.events() if e["EventIdentification"]["EventOutcomeIndicator"] == 12]
    assert len(burnt) == 1
    agent.clock.now += SOURCE_REFILL  # 15 refusals from one address: one more in full now
    outcome, answer = await exchange(
        agent, with_password(token, PASSWORDS["carol"]), directory=directory
    )
    assert_refused(agent, outcome, answer, "burnt", BURNT)


async def test_a_directory_outage_is_not_a_wrong_password(
    agent: Agent, directory: CountingDirectory, slapd: Slapd
) -> None:
    token = user_token(agent, "carol")
    for _ in range(MAX_PASSWORD_FAILURES - 1):
        outcome, answer = await exchange(agent, with_password(token, "guess"), directory=directory)
        assert_refused(agent, outcome, answer, "wrong_password", "wrong password")
    slapd.kill()
    for _ in range(MAX_PASSWORD_FAILURES + 1):
        outcome, answer = await exchange(agent, with_password(token, "guess"), directory=directory)
        assert_refused(agent, outcome, answer, "directory_unavailable", "directory unavailable")
    slapd.start()
    outcome, _ = await exchange(
        agent, with_password(token, PASSWORDS["carol"]), directory=directory
    )
    assert outcome.ok  # one try was left, and the right password takes it


async def test_a_directory_answering_busy_does_not_spend_tries(agent: Agent) -> None:
    """A bind answered busy (51) used to be a wrong password: the user was told so with
    the right password, and after MAX_PASSWORD_FAILURES such answers the code burnt."""
    ldap = await FakeLdap(51, "server busy").start()
    directory = Directory(ldap.settings())
    try:
        token = user_token(agent, "alice")
        for _ in range(MAX_PASSWORD_FAILURES + 1):
            outcome, answer = await exchange(
                agent, with_password(token, "the right password"), directory=directory
            )
            assert_refused(agent, outcome, answer, "directory_unavailable", "directory unavailable")
            assert answer is not None and "try again later" in answer["reason"]
        assert ldap.user_binds == MAX_PASSWORD_FAILURES + 1
        ldap.user_bind = (0, "")  # back: no try was spent
        outcome, _ = await exchange(
            agent, with_password(token, "the right password"), directory=directory
        )
        assert outcome.ok and agent.registry.device_user("ws1") == "alice"
    finally:
        directory.close()
        await ldap.close()


async def test_a_user_outside_the_group_does_not_spend_tries(
    agent: Agent, directory: CountingDirectory
) -> None:
    """Only a wrong password counts: bob (right password, not in the group) may try
    again once IT has added him."""
    token = user_token(agent, "bob")
    for _ in range(MAX_PASSWORD_FAILURES + 1):
        outcome, answer = await exchange(
            agent, with_password(token, PASSWORDS["bob"]), directory=directory
        )
        assert_refused(agent, outcome, answer, "not_in_group", "not in group")
    assert directory.binds == MAX_PASSWORD_FAILURES + 1


def enrollment_refusals(agent: Agent) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.events()
        if e["kind"] == "enrollment" and e["EventIdentification"]["EventOutcomeIndicator"]
    ]


def refusals_in(events: list[dict[str, Any]]) -> int:
    return sum(e["aggregate"]["count"] if "aggregate" in e else 1 for e in events)


async def test_a_flood_of_refused_enrollments_cannot_rotate_the_security_set(
    agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone at the gateway's enrollment door, and a compromised gateway making up a
    peer address for each request, is refused at no cost: 400 refusals (~240 KB of
    events) used to rotate the smallest security set (64 KiB and one older file) twice
    over. Now the first ones of each source are written, the rest counted: the earlier
    enrollment stays, and the aggregates say how many."""
    (tmp_path / "small").mkdir()
    agent.audit = AuditLog(
        tmp_path / "small" / AUDIT_FILE,
        source_id="spiffe://hospital.test/agent/main",
        max_bytes=MAX_LINE_BYTES,
        keep=1,
    )
    assert (await exchange(agent, request(agent.token())))[0].ok
    monkeypatch.setattr(enrollment, "_refusal_lines", LogLimiter(total=REFUSAL_LINES_TOTAL))
    bad = {"v": 1, "device": "ws9"}  # no code: refused as malformed before anything else
    with caplog.at_level(logging.WARNING, logger="relay.agent.enrollment"):
        for _ in range(200):  # one source
            outcome, _ = await exchange(agent, bad)
            assert outcome.result == "malformed"
    # ... and its log lines are limited too (they were one a refusal).
    lines = [r for r in caplog.records if r.getMessage() == "enrollment refused"]
    assert LOG_BURST <= len(lines) <= LOG_BURST + 2
    for i in range(200):  # a source made up for each request
        await exchange(agent, bad, {"x-relay-peer": f"198.51.100.{i % 250}:{1000 + i}"})
    agent.audit.close()
    first = next(e for e in agent.events() if e["kind"] == "enrollment")
    assert first["EventIdentification"]["EventOutcomeIndicator"] == 0, "rotated away"
    refused = enrollment_refusals(agent)
    assert refusals_in(refused) == 400
    assert len(refused) <= KIND_BURST + MAX_AGGREGATES + 1
    one = [e["aggregate"] for e in refused if e.get("aggregate", {}).get("source") == "203.0.113.9"]
    assert one == [
        {
            "count": 200 - SOURCE_BURST,
            "first": "2030-01-01T12:00:00.000000Z",
            "last": "2030-01-01T12:00:00.000000Z",
            "source": "203.0.113.9",
            "sources": ["203.0.113.9"],
        }
    ]
    [others] = [e["aggregate"] for e in refused if e.get("aggregate", {}).get("source") == "*"]
    assert len(others["sources"]) == 8 and others["sources"][0].startswith("198.51.100.")


async def test_a_refused_enrollment_over_the_budget_is_written_once_due(agent: Agent) -> None:
    bad = {"v": 1, "device": "ws9"}
    for _ in range(SOURCE_BURST + 5):
        await exchange(agent, bad)
    assert len(enrollment_refusals(agent)) == SOURCE_BURST
    agent.clock.now = T0 + AGGREGATE_INTERVAL  # the next event writes what is due first
    assert (await exchange(agent, request(agent.token())))[0].ok
    *_, aggregate, ok = [e for e in agent.events() if e["kind"] == "enrollment"]
    assert aggregate["aggregate"]["count"] == 5
    assert aggregate["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert (
        "aggregated: 5 enrollment refusals from 203.0.113.9"
        in (aggregate["EventIdentification"]["EventOutcomeDescription"])
    )
    assert ok["EventIdentification"]["EventOutcomeIndicator"] == 0
