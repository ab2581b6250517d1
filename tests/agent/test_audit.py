"""The audit trail: PS3.15 fields and codes, rotation, concurrent writers, syslog over TLS."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import re
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.agent.audit import (
    AUDIT_FILE,
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    MAX_LINE_BYTES,
    AuditEvent,
    AuditLog,
    AuditSettings,
    Code,
    Outcome,
    Participant,
    ParticipantObject,
    device_dir,
    read_audit_settings,
    read_events,
)
from relay.agent.audit.events import MAX_QUERY_BYTES, MAX_QUERY_DETAIL
from relay.agent.syslog import (
    DROP_LOG_INTERVAL,
    SyslogSender,
    client_context,
    format_rfc5424,
    octet_frame,
    severity_for,
)
from relay.ops.config import Address
from relay.ops.configfile import open_config
from tests.pki_helpers import HOST, make_pki

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
AGENT = "spiffe://hospital.test/agent/main"
DEVICE = "spiffe://hospital.test/device/main/ws1"
WAIT = 10.0


def code_of(event: dict[str, Any]) -> str:
    return str(event["EventIdentification"]["EventID"]["csd-code"])


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / AUDIT_FILE, source_id=AGENT, site="main")


def test_enrollment_event_fields(audit: AuditLog) -> None:
    audit.enrollment(
        now=T0,
        device=DEVICE,
        token_id="0123456789abcdef",
        peer="203.0.113.9:50122",
        outcome=Outcome.SUCCESS,
        description="certificate issued",
        serial="abc",
    )
    (event,) = read_events(audit.path)
    ident = event["EventIdentification"]
    assert event["kind"] == "enrollment"
    assert ident["EventID"] == {
        "csd-code": "110114",
        "codeSystemName": "DCM",
        "originalText": "User Authentication",
    }
    assert ident["EventTypeCode"][0]["csd-code"] == "110122"  # Login
    assert ident["EventActionCode"] == "E"
    assert ident["EventOutcomeIndicator"] == 0
    assert ident["EventDateTime"] == "2030-01-01T12:00:00.000000Z"
    device, agent = event["ActiveParticipant"]
    assert device == {
        "UserID": DEVICE,
        "UserIsRequestor": True,
        "NetworkAccessPointTypeCode": 2,
        "NetworkAccessPointID": "203.0.113.9",
    }
    assert agent["UserID"] == AGENT and agent["UserIsRequestor"] is False
    assert event["AuditSourceIdentification"] == {
        "AuditSourceID": AGENT,
        "AuditSourceTypeCode": "4",
        "AuditEnterpriseSiteID": "main",
    }
    ids = [o["ParticipantObjectID"] for o in event["ParticipantObjectIdentification"]]
    assert ids == ["abc", "0123456789abcdef"]


def test_codes_of_each_kind(audit: AuditLog) -> None:
    audit.enrollment(now=T0, device=DEVICE, token_id=None, peer=None, outcome=Outcome.MINOR_FAILURE)
    audit.renewal(now=T0, device=DEVICE, outcome=Outcome.SUCCESS, serial="1", not_after=T0)
    audit.token_created(now=T0, device="ws1", token_id="t", expires_at=T0, actor="cli:it@h")
    audit.revocation(now=T0, device=DEVICE, actor="cli:it@h")
    audit.auth_refused(now=T0, identity=DEVICE, peer="[::1]:4000", reason="revoked", reporter="gw")
    audit.query(
        now=T0,
        device=DEVICE,
        sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
        outcome=Outcome.SUCCESS,
        query=b"\x08\x00\x52\x00",
        details={"QueryRetrieveLevel": "STUDY", "Matches": 3},
    )
    audit.transfer_begin(now=T0, device=DEVICE, study_uid="1.2.3", patient_id="P1")
    audit.transfer_end(
        now=T0,
        device=DEVICE,
        study_uid="1.2.3",
        outcome=Outcome.MINOR_FAILURE,
        completed=9,
        failed=1,
    )
    events = read_events(audit.path)
    table = [
        (e["kind"], code_of(e), e["EventIdentification"]["EventOutcomeIndicator"]) for e in events
    ]
    assert table == [
        ("enrollment", "110114", 4),
        ("renewal", "110113", 0),
        ("token_created", "110113", 0),
        ("revocation", "110113", 0),
        ("auth_refused", "110113", 4),
        ("query", "110112", 0),
        ("transfer_begin", "110102", 0),
        ("transfer_end", "110104", 4),
    ]
    types = [e["EventIdentification"].get("EventTypeCode", [{}])[0].get("csd-code") for e in events]
    assert types[1:5] == ["110137", "110137", "110137", "110126"]
    refused = events[4]["ActiveParticipant"][0]
    assert refused["NetworkAccessPointID"] == "::1"
    query = events[5]["ParticipantObjectIdentification"][0]
    assert query["ParticipantObjectIDTypeCode"]["csd-code"] == "110181"
    assert base64.b64decode(query["ParticipantObjectQuery"]) == b"\x08\x00\x52\x00"
    begin = events[6]
    roles = [p["RoleIDCode"]["csd-code"] for p in begin["ActiveParticipant"]]
    assert roles == ["110152", "110153"]  # the device receives, the agent sends
    study, patient = begin["ParticipantObjectIdentification"]
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"]) == (
        1,
        1,
    )
    end = events[7]
    assert end["EventIdentification"]["EventActionCode"] == "R"
    details = {
        d["type"]: d["value"]
        for d in end["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    }
    assert details == {"Completed": "9", "Failed": "1", "Warning": "0"}


def test_file_is_private(audit: AuditLog) -> None:
    audit.revocation(now=T0, device=DEVICE, actor="x")
    assert stat.S_IMODE(os.stat(audit.path).st_mode) == 0o600


def test_field_sizes_are_bounded(audit: AuditLog) -> None:
    objects = [
        ParticipantObject(
            "1." * 2000,
            Code("1", "X", "y"),
            query=b"q" * 100_000,
            details={f"k{i}": "v" * 5000 for i in range(50)},
        )
        for _ in range(40)
    ]
    event = AuditEvent(
        "test",
        Code("1", "X", "y"),
        "E",
        T0,
        Outcome.SUCCESS,
        "d" * 10_000,
        participants=[Participant("u" * 5000, True)] * 20,
        objects=objects,
    )
    assert audit.log(event)
    raw = audit.path.read_bytes()
    assert len(raw) <= MAX_LINE_BYTES + 1
    (line,) = read_events(audit.path)
    assert len(line["ActiveParticipant"]) == 8
    assert len(line["EventIdentification"]["EventOutcomeDescription"]) == 1024


QUERY_KEYS = (
    "QueryRetrieveLevel",
    "PatientID",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def test_a_query_event_stays_small_whatever_the_device_sends(audit: AuditLog) -> None:
    """A device's C-FINDs must not rotate the other devices' records away: the event keeps
    the first MAX_QUERY_BYTES of the identifier and the SHA-256 and length of the whole,
    and details of at most MAX_QUERY_DETAIL characters. Before: ~17 KB an event."""
    identifier = os.urandom(100_000)
    details: dict[str, object] = {k: "9" * 5000 for k in QUERY_KEYS}
    audit.query(
        now=T0,
        device=DEVICE,
        sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
        outcome=Outcome.SUCCESS,
        query=identifier,
        details={**details, "Matches": 12, "Status": "0x0000"},
    )
    raw = audit.devices.path_of(DEVICE).read_bytes()
    assert len(raw) <= 4 * 1024
    (event,) = read_events(audit.path)
    (obj,) = event["ParticipantObjectIdentification"]
    assert base64.b64decode(obj["ParticipantObjectQuery"]) == identifier[:MAX_QUERY_BYTES]
    assert MAX_QUERY_BYTES == 512
    got = {d["type"]: d["value"] for d in obj["ParticipantObjectDetail"]}
    assert got["QuerySHA256"] == hashlib.sha256(identifier).hexdigest()
    assert got["QueryLength"] == "100000"
    assert list(got)[:2] == ["QuerySHA256", "QueryLength"]
    assert all(len(got[k]) == MAX_QUERY_DETAIL for k in QUERY_KEYS)
    assert (got["Matches"], got["Status"]) == ("12", "0x0000")
    # The device's own default set holds 30,000 of its largest queries (before: ~18 KB
    # each, 6,500 of them; ~9,500 of smaller ones); they rotate only that device's records.
    assert DEFAULT_MAX_BYTES * (DEFAULT_KEEP + 1) // len(raw) > 30_000


def test_a_short_query_is_stored_whole_with_its_hash(audit: AuditLog) -> None:
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
    audit.query(
        now=T0, device=DEVICE, sop_class_uid="1.2", outcome=Outcome.SUCCESS, query=identifier
    )
    (event,) = read_events(audit.path)
    (obj,) = event["ParticipantObjectIdentification"]
    assert base64.b64decode(obj["ParticipantObjectQuery"]) == identifier
    got = {d["type"]: d["value"] for d in obj["ParticipantObjectDetail"]}
    assert got == {
        "QuerySHA256": hashlib.sha256(identifier).hexdigest(),
        "QueryLength": str(len(identifier)),
    }


def test_naive_time_is_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="timezone"):
        audit.revocation(now=datetime(2030, 1, 1), device=DEVICE, actor="x")


def test_rotation_keeps_n_files(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    audit = AuditLog(path, source_id=AGENT, max_bytes=MAX_LINE_BYTES, keep=3)
    for i in range(400):
        audit.revocation(now=T0, device=f"{DEVICE}{i}", actor="x" * 400)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(AUDIT_FILE + "."))
    assert files == [f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.3", f"{AUDIT_FILE}.lock"]
    for p in tmp_path.glob(AUDIT_FILE + "*"):
        if not p.name.endswith(".lock"):
            assert p.stat().st_size <= MAX_LINE_BYTES
    events = read_events(path)
    # The newest events survive, in order, and the oldest were dropped.
    numbers = [
        int(e["ParticipantObjectIdentification"][0]["ParticipantObjectID"][len(DEVICE) :])
        for e in events
    ]
    assert numbers == sorted(numbers) and numbers[-1] == 399 and numbers[0] > 0
    assert audit.written == 400 and audit.failures == 0


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "missing" / AUDIT_FILE, source_id=AGENT)
    assert not audit.log(AuditEvent("x", Code("1", "X", "y"), "E", T0, Outcome.SUCCESS))
    assert audit.failures == 1


_APPENDER = """
import sys, datetime as dt
from pathlib import Path
from relay.agent.audit import AuditLog, Outcome
audit = AuditLog(Path(sys.argv[1]), source_id=sys.argv[2], max_bytes=65536, keep=1000)
t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
for i in range(int(sys.argv[3])):
    audit.revocation(now=t0, device=f"{sys.argv[2]}-{i}", actor="y" * 200)
    audit.query(now=t0, device="spiffe://h/device/main/shared", sop_class_uid="1.2",
                outcome=Outcome.SUCCESS, query=b"q" * 500, details={"Seq": f"{sys.argv[2]}-{i}"})
"""


def _numbers(events: list[dict[str, Any]], name: str, kind: str) -> list[int]:
    """The sequence numbers of process `name`'s events of `kind`, in the order read."""
    out = []
    for e in events:
        if e["kind"] != kind or e["AuditSourceIdentification"]["AuditSourceID"] != name:
            continue
        obj = e["ParticipantObjectIdentification"][0]
        ident = (
            obj["ParticipantObjectID"]
            if kind == "revocation"
            else obj["ParticipantObjectDetail"][-1]["value"]
        )
        out.append(int(str(ident).rsplit("-", 1)[1]))
    return out


def test_processes_append_and_rotate_concurrently(tmp_path: Path) -> None:
    """Three processes write to the security set and to one device's set at once."""
    path = tmp_path / AUDIT_FILE
    n = 300
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), name, str(n)])
        for name in ("p1", "p2", "p3")
    ]
    for proc in procs:
        assert proc.wait(120) == 0
    events = read_events(path)
    assert len(events) == 2 * 3 * n  # nothing lost at any rotation, no torn line
    assert len(list(device_dir(path).glob("main_shared-*.jsonl.*"))) > 3  # it rotated
    for name in ("p1", "p2", "p3"):
        assert _numbers(events, name, "revocation") == list(range(n))
        assert _numbers(events, name, "query") == list(range(n))


def test_settings_from_config(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "audit:\n  max_size: 1MiB\n  keep: 4\n  syslog:\n    address: 127.0.0.1:6514\n"
        "    ca: ca.crt\n"
    )
    r = open_config(cfg)
    settings = read_audit_settings(r)
    r.done()
    assert settings.max_bytes == 1 << 20 and settings.keep == 4
    assert settings.syslog is not None and settings.syslog.address == Address("127.0.0.1", 6514)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert read_audit_settings(open_config(empty)) == AuditSettings()
    bad = tmp_path / "bad.yaml"
    bad.write_text("audit:\n  max_size: 10\n")
    with pytest.raises(Exception, match=r"audit\.max_size"):
        read_audit_settings(open_config(bad))


# --- syslog ---------------------------------------------------------------------------

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf(.*)", re.DOTALL)


def test_rfc5424_format() -> None:
    msg = format_rfc5424(
        '{"kind":"x","é":1}',
        at=T0,
        severity=severity_for(Outcome.MINOR_FAILURE),
        hostname="agent host",
        procid="42",
        msgid="auth_refused",
    )
    m = RFC5424.fullmatch(msg)
    assert m is not None
    assert m.group(1) == b"84"  # authpriv (10) * 8 + warning (4)
    assert m.group(2) == b"2030-01-01T12:00:00.000000Z"
    assert m.group(3) == b"agent_host"  # no spaces in a header field
    assert (m.group(4), m.group(5), m.group(6)) == (b"dmzrelay", b"42", b"auth_refused")
    assert json.loads(m.group(7).decode()) == {"kind": "x", "é": 1}
    assert format_rfc5424("m", at=T0, severity=5).split(b" ")[2] == b"-"
    with pytest.raises(ValueError):
        format_rfc5424("m", at=T0, severity=9)


def test_octet_counting() -> None:
    assert octet_frame(b"hello") == b"5 hello"
    assert octet_frame("é".encode()) == b"2 \xc3\xa9"


class Collector:
    """A syslog-over-TLS collector on 127.0.0.1 that parses octet-counted frames."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.messages: list[bytes] = []
        self.arrived = asyncio.Condition()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.clients: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, port, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.clients):  # Python 3.11 servers do not close their clients
            writer.transport.abort()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                size = int((await reader.readuntil(b" "))[:-1])
                data = await reader.readexactly(size)
                async with self.arrived:
                    self.messages.append(data)
                    self.arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
        finally:
            self.clients.discard(writer)
            self.handlers.discard(task)

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(WAIT), self.arrived:
            await self.arrived.wait_for(lambda: len(self.messages) >= n)


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[tuple[Collector, ssl.SSLContext]]:
    site = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(site.gateway.cert, site.gateway.key)
    c = Collector(server_ctx)
    await c.start()
    yield c, client_context(site.ca)
    await c.stop()


async def test_events_reach_the_collector(
    tmp_path: Path, collector: tuple[Collector, ssl.SSLContext]
) -> None:
    coll, ctx = collector
    sender = SyslogSender(Address(HOST, coll.port), ctx, hostname="agent1")
    sender.start()
    audit = AuditLog(tmp_path / AUDIT_FILE, source_id=AGENT, sink=sender)
    for i in range(20):
        audit.revocation(now=T0, device=f"{DEVICE}{i}", actor="x")
    await coll.wait_for(20)
    await sender.close()
    m = RFC5424.fullmatch(coll.messages[0])
    assert m is not None and m.group(6) == b"revocation" and m.group(1) == b"85"
    lines = [json.loads(RFC5424.fullmatch(msg).group(7)) for msg in coll.messages]  # type: ignore[union-attr]
    assert lines == read_events(audit.path)  # the same events, in the same order
    assert sender.stats.sent == 20 and sender.stats.dropped == 0


async def test_full_queue_drops_and_counts(
    collector: tuple[Collector, ssl.SSLContext],
) -> None:
    coll, ctx = collector
    sender = SyslogSender(Address(HOST, coll.port), ctx, queue_size=5, max_message=100)
    for i in range(8):  # not started: nothing leaves the queue
        sender.submit(b"m%d" % i)
    assert sender.queued == 5 and sender.stats.dropped == 3
    assert not sender.submit(b"x" * 101) and sender.stats.oversized == 1
    sender.start()
    await coll.wait_for(5)
    await sender.close()
    assert coll.messages == [b"m0", b"m1", b"m2", b"m3", b"m4"]


async def test_queued_bytes_are_bounded_whatever_the_event_count(
    collector: tuple[Collector, ssl.SSLContext],
) -> None:
    """A flood of large events fills the byte budget long before the event count."""
    coll, ctx = collector
    sender = SyslogSender(
        Address(HOST, coll.port), ctx, queue_size=1000, max_message=100, max_queued_bytes=300
    )
    for i in range(10):  # not started: nothing leaves the queue
        sender.submit(b"%02d" % i + b"x" * 88)  # 90 bytes, framed 93
    assert sender.queued == 3 and sender.queued_bytes == 279 and sender.stats.dropped == 7
    sender.start()
    await coll.wait_for(3)
    await sender.close()
    assert sender.queued_bytes == 0
    assert [m[:2] for m in coll.messages] == [b"00", b"01", b"02"]


def test_drops_are_logged_once_a_minute_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    sender = SyslogSender(
        Address(HOST, 6514), ssl.create_default_context(), queue_size=1, clock=lambda: now[0]
    )
    assert sender.submit(b"kept")
    with caplog.at_level("WARNING", logger="relay.agent.syslog"):
        for _ in range(500):  # a flood while the collector is away
            assert not sender.submit(b"dropped")
        now[0] += DROP_LOG_INTERVAL / 2
        sender.submit(b"dropped")
        assert len(caplog.records) == 1 and "1 audit event(s)" in caplog.records[0].getMessage()
        now[0] += DROP_LOG_INTERVAL / 2
        sender.submit(b"dropped")
    assert len(caplog.records) == 2
    assert "501 audit event(s)" in caplog.records[1].getMessage()
    assert "502 dropped in all" in caplog.records[1].getMessage()
    assert sender.stats.dropped == 502


async def test_collector_restart_loses_nothing_known_to_have_failed(
    collector: tuple[Collector, ssl.SSLContext],
) -> None:
    coll, ctx = collector
    sender = SyslogSender(Address(HOST, coll.port), ctx, retry_initial=0.01, retry_max=0.05)
    sender.start()
    sender.submit(b"before")
    await coll.wait_for(1)
    port = coll.port
    await coll.stop()
    # Without acknowledgements, a message written just as the collector died may vanish
    # (documented); the first write after that fails and is kept for the next connection.
    sender.submit(b"probe")
    for i in range(3):
        sender.submit(b"during%d" % i)
    async with asyncio.timeout(WAIT):
        # the failure was noticed, reconnects are refused
        while sender.stats.errors < 2:  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.01)
    await coll.start(port)
    await coll.wait_for(4)
    await sender.close()
    assert coll.messages[0] == b"before"
    assert [m for m in coll.messages if m.startswith(b"during")] == [
        b"during0",
        b"during1",
        b"during2",
    ]


async def test_untrusted_collector_is_not_sent_to(tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", trust_domain="other.test")
    site = make_pki(tmp_path / "site")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(other.gateway.cert, other.gateway.key)
    coll = Collector(server_ctx)
    await coll.start()
    sender = SyslogSender(
        Address(HOST, coll.port), client_context(site.ca), retry_initial=0.01, retry_max=0.02
    )
    sender.start()
    sender.submit(b"secret")
    async with asyncio.timeout(WAIT):
        while sender.stats.errors < 2:  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.01)
    await sender.close(timeout=0.1)
    await coll.stop()
    assert coll.messages == [] and sender.queued == 1


def test_every_event_of_a_bound_device_names_its_user(audit: AuditLog) -> None:
    dev = "spiffe://hospital.test/device/main/ws1"
    audit.user_of = lambda uri: "alice" if uri == dev else None
    audit.query(now=T0, device=dev, sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
                outcome=Outcome.SUCCESS)  # fmt: skip
    audit.revocation(now=T0, device=dev, actor="cli:it@host")
    audit.renewal(now=T0, device="spiffe://hospital.test/device/main/ws2", outcome=Outcome.SUCCESS)
    audit.token_created(
        now=T0, device="ws3", token_id="00" * 8, expires_at=T0, actor="cli:it", user="bob"
    )
    events = {e["kind"]: e for e in read_events(audit.path)}  # one time: any order
    got = {kind: e.get("user") for kind, e in events.items()}
    assert got == {"query": "alice", "revocation": "alice", "renewal": None, "token_created": "bob"}
    device = events["query"]["ActiveParticipant"][0]
    assert device["UserID"] == dev and device["UserName"] == "alice"


#: What str.splitlines() splits on besides "\n" (JSON leaves them raw unless escaped).
LINE_BREAKS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c\r"


def test_line_separators_in_text_neither_hide_nor_forge_events(audit: AuditLog) -> None:
    """An outsider's text (the IT login's user name, a device name) with Unicode line
    separators: one event, read back intact, and no raw separator in the file."""
    forged = f'bob{LINE_BREAKS}{{"kind":"forged"}}{LINE_BREAKS}x'
    audit.it_login(
        now=T0, admin=forged, peer="10.0.0.9", outcome=Outcome.MINOR_FAILURE, description=forged
    )
    audit.enrollment(now=T0, device=forged, token_id=None, peer=None, outcome=Outcome.MINOR_FAILURE)
    raw = audit.path.read_bytes()
    assert raw.count(b"\n") == 2
    assert raw.isascii()  # the escapes: no reader can split an event on them
    events = read_events(audit.path)
    assert [e["kind"] for e in events] == ["it_login", "enrollment"]
    assert events[0]["ActiveParticipant"][0]["UserID"] == f"it:{forged}"
    assert events[1]["ActiveParticipant"][0]["UserID"] == forged
    # A file written before (raw separators in it) is read by lines of "\n" only.
    audit.path.write_text(
        json.dumps({"kind": "it_login", "user": forged}, ensure_ascii=False) + "\n", "utf-8"
    )
    assert [e["user"] for e in read_events(audit.path)] == [forged]
