"""The audit trail's sets: the security events and each device's DICOM events rotate
apart, the device sets are bounded, readers (read_events, the IT pages' view) merge them
in time order, and a trail of the old layout (one file set for everything) still reads."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.agent.audit import (
    AUDIT_FILE,
    DEFAULT_MAX_DEVICES,
    MAX_LINE_BYTES,
    AuditLog,
    Outcome,
    device_dir,
    read_audit_settings,
    read_events,
)
from relay.agent.audit import files as audit_files
from relay.agent.audit.budget import budgeted, written_refusal
from relay.agent.audit.events import AuditEvent
from relay.agent.audit.files import device_set_name, list_sets, merged_events
from relay.agent.itpages import auditview
from relay.agent.itpages.auditview import KINDS, AuditFilter, query_audit
from relay.ops.config import ConfigError
from relay.ops.configfile import open_config

# Events are written as they happen, before their files' last write: a newest-first
# merge opens a set once it reaches that time (files.MTIME_SLACK), so not in the future.
T0 = datetime.now(dt.UTC).replace(microsecond=0) - timedelta(days=1)
AGENT = "spiffe://hospital.test/agent/main"
HOSTILE = "spiffe://hospital.test/device/main/hostile"
OTHER = "spiffe://hospital.test/device/main/ws2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def at(i: int) -> datetime:
    return T0 + timedelta(seconds=i)


def small_trail(tmp_path: Path, *, keep: int = 2, max_devices: int = 8) -> AuditLog:
    return AuditLog(
        tmp_path / AUDIT_FILE,
        source_id=AGENT,
        site="main",
        max_bytes=MAX_LINE_BYTES,
        keep=keep,
        max_devices=max_devices,
    )


def query(audit: AuditLog, device: str, i: int) -> None:
    audit.query(
        now=at(i),
        device=device,
        sop_class_uid=FIND,
        outcome=Outcome.SUCCESS,
        query=b"q" * 400,
        details={"QueryRetrieveLevel": "STUDY", "Seq": i},
    )


def security_events(audit: AuditLog, i: int) -> None:
    """One of each security kind a device's flood used to rotate away."""
    audit.enrollment(now=at(i), device=OTHER, token_id="00" * 8, peer=None, outcome=Outcome.SUCCESS)
    audit.token_created(now=at(i), device="ws3", token_id="11" * 8, expires_at=T0, actor="it:a")
    audit.renewal(now=at(i), device=OTHER, outcome=Outcome.SUCCESS)
    audit.revocation(now=at(i), device=OTHER, actor="cli:it")
    audit.auth_refused(now=at(i), identity=None, peer="198.51.100.7:1", reason="x", reporter="g")


def seq(event: dict[str, Any]) -> int:
    (obj,) = event["ParticipantObjectIdentification"]
    return int({d["type"]: d["value"] for d in obj["ParticipantObjectDetail"]}["Seq"])


def requestor(event: dict[str, Any]) -> str:
    return str(event["ActiveParticipant"][0]["UserID"])


def queries_of(events: list[dict[str, Any]], device: str) -> list[int]:
    return [seq(e) for e in events if e["kind"] == "query" and requestor(e) == device]


def set_sizes(directory: Path, name: str) -> list[int]:
    return [p.stat().st_size for p in directory.iterdir() if p.name.startswith(name)]


def test_one_devices_flood_rotates_neither_another_devices_records_nor_the_security_events(
    tmp_path: Path,
) -> None:
    """The hostile device's queries (three sets' worth) rotate only its own set."""
    audit = small_trail(tmp_path)
    security_events(audit, 0)
    for i in range(1, 6):
        query(audit, OTHER, i)
    flood = 3 * 3 * MAX_LINE_BYTES // 900  # each event ~900 bytes: three full sets
    for i in range(10, 10 + flood):
        query(audit, HOSTILE, i)
    assert audit.failures == 0

    events = read_events(audit.path)
    kinds = [e["kind"] for e in events if e["kind"] != "query"]
    assert kinds == ["enrollment", "token_created", "renewal", "revocation", "auth_refused"]
    assert queries_of(events, OTHER) == [1, 2, 3, 4, 5]
    mine = queries_of(events, HOSTILE)
    assert mine[-1] == 10 + flood - 1 and mine[0] > 10  # its own oldest rotated away
    assert mine == list(range(mine[0], mine[-1] + 1))  # nothing lost in between
    # Its set holds at most 1 + keep files, each at most max_bytes.
    sizes = set_sizes(device_dir(audit.path), device_set_name(HOSTILE))
    assert len(sizes) == 3 and max(sizes) <= MAX_LINE_BYTES


def test_device_events_go_to_a_private_set_named_by_the_device_not_the_patient(
    tmp_path: Path,
) -> None:
    audit = small_trail(tmp_path)
    audit.transfer_begin(now=T0, device=OTHER, study_uid="1.2.3", patient_id="PID-777")
    directory = device_dir(audit.path)
    (file,) = [p for p in directory.iterdir() if p.name != audit_files.DEVICE_LOCK]
    assert file.name.startswith("main_ws2-") and file.name.endswith(".jsonl")
    assert "PID-777" in file.read_text() and not audit.path.exists()
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    # Two IDs that make the same readable part still get sets of their own.
    assert device_set_name("spiffe://a/device/main/w s") != device_set_name(
        "spiffe://a/device/main/w_s"
    )
    assert device_set_name("spiffe://a/device/../../etc").startswith("_.._etc-")


def test_the_device_sets_are_bounded_and_the_set_idle_longest_is_pruned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = small_trail(tmp_path, max_devices=3)
    directory = device_dir(audit.path)
    devices = [f"spiffe://hospital.test/device/main/ws{n}" for n in range(5)]
    for n, device in enumerate(devices[:3]):
        query(audit, device, n)
        os.utime(audit.devices.path_of(device), (1000 + n, 1000 + n))  # ws0 idlest
    query(audit, devices[0], 3)  # ws0 written again: ws1 is now the idlest
    security_events(audit, 4)
    with caplog.at_level(logging.WARNING, logger="relay.agent.audit.files"):
        query(audit, devices[3], 5)
    assert sorted(list_sets(directory)) == sorted(
        device_set_name(d) for d in (devices[0], devices[2], devices[3])
    )
    assert audit.devices.pruned == 1
    assert any("audit.max_devices" in r.getMessage() for r in caplog.records)
    query(audit, devices[0], 6)  # an existing set: nothing pruned
    assert audit.devices.pruned == 1 and len(list_sets(directory)) == 3
    events = read_events(audit.path)
    kinds = [e["kind"] for e in events if e["kind"] != "query"]
    assert len(kinds) == 5 + 1 and kinds.count("audit_pruned") == 1  # the 5: never pruned
    assert {requestor(e) for e in events if e["kind"] == "query"} == {
        devices[0],
        devices[2],
        devices[3],
    }


class Sink:
    """A sink that keeps what it is given (the syslog sender's place)."""

    def __init__(self) -> None:
        self.got: list[tuple[AuditEvent, str]] = []

    def emit(self, event: AuditEvent, line: str) -> None:
        self.got.append((event, line))


def test_a_pruned_set_is_audited_in_the_security_set_and_reaches_the_sink(
    tmp_path: Path,
) -> None:
    """max_devices=2, three devices write: the first device's set (two files: it rotated)
    is deleted, and the security set says so, naming the set and its device, the files
    and the reason, and no line of it (its patient ID stays where it was: gone). The
    record reaches the sink too, and is no refusal the budget counts. It used to be only
    a warning in the operational log."""
    sink = Sink()
    audit = AuditLog(
        tmp_path / AUDIT_FILE,
        source_id=AGENT,
        site="main",
        max_bytes=MAX_LINE_BYTES,
        keep=2,
        max_devices=2,
        sink=sink,
    )
    devices = [f"spiffe://hospital.test/device/main/ws{n}" for n in range(3)]
    audit.transfer_begin(now=at(0), device=devices[0], study_uid="1.2.3", patient_id="PID-777")
    first = audit.devices.path_of(devices[0])
    i = 1
    while not first.with_name(first.name + ".1").exists():  # until it rotates once
        query(audit, devices[0], i)
        i += 1
    victim = device_set_name(devices[0])
    directory = device_dir(audit.path)
    assert len([p for p in directory.iterdir() if p.name.startswith(victim)]) == 2
    os.utime(first, (1000, 1000))  # the idlest
    query(audit, devices[1], 500)
    assert not audit.path.exists()  # two sets: nothing pruned, nothing said

    query(audit, devices[2], 501)
    assert [p for p in directory.iterdir() if p.name.startswith(victim)] == []
    assert sorted(list_sets(directory)) == sorted(device_set_name(d) for d in devices[1:])
    text = audit.path.read_text()
    assert "PID-777" not in text
    (record,) = [json.loads(line) for line in text.splitlines()]
    assert record["kind"] == "audit_pruned"
    ident = record["EventIdentification"]
    assert ident["EventID"]["csd-code"] == "110113"  # Security Alert
    assert [c["csd-code"] for c in ident["EventTypeCode"]] == ["110133"]  # Recording Stopped
    assert ident["EventOutcomeIndicator"] == 0
    assert "audit.max_devices (2) reached" in ident["EventOutcomeDescription"]
    assert record["ActiveParticipant"] == [
        {
            "UserID": AGENT,
            "UserIsRequestor": True,
            "RoleIDCode": {
                "csd-code": "110150",
                "codeSystemName": "DCM",
                "originalText": "Application",
            },
        }
    ]
    (obj,) = record["ParticipantObjectIdentification"]
    assert obj["ParticipantObjectID"] == victim
    assert obj["ParticipantObjectName"] == devices[0]
    details = {d["type"]: d["value"] for d in obj["ParticipantObjectDetail"]}
    assert details == {"Files": "2", "MaxDevices": "2", "LastWrite": "1970-01-01T00:16:40.000000Z"}
    # The sink got it after the event whose set made room, the same line as the file's.
    assert [event.kind for event, _ in sink.got[-2:]] == ["query", "audit_pruned"]
    pruned_event, line = sink.got[-1]
    assert json.loads(line) == record
    assert not budgeted(pruned_event) and written_refusal(record) is None
    assert audit.devices.pruned == 1 and audit.failures == 0 and audit.budget.pending == 0
    # The IT pages' audit view offers the kind as a filter, and finds it.
    assert "audit_pruned" in KINDS
    found = query_audit(audit.path, AuditFilter(kind="audit_pruned"), page_size=10)
    assert [e["kind"] for e in found.events] == ["audit_pruned"]


def test_a_set_whose_first_line_names_another_device_is_named_by_its_set_alone(
    tmp_path: Path,
) -> None:
    """The device a pruned set is said to be of is the one its name is made from: a line
    naming another ID (damaged, or put there) names nothing."""
    audit = small_trail(tmp_path, max_devices=1)
    query(audit, OTHER, 0)
    path = audit.devices.path_of(OTHER)
    path.write_text(path.read_text().replace(OTHER, HOSTILE))
    query(audit, HOSTILE, 1)
    (record,) = [json.loads(line) for line in audit.path.read_text().splitlines()]
    (obj,) = record["ParticipantObjectIdentification"]
    assert obj["ParticipantObjectID"] == device_set_name(OTHER)
    assert "ParticipantObjectName" not in obj


def test_a_set_pruned_in_part_is_still_audited(tmp_path: Path) -> None:
    """A file of the set that cannot be deleted (here a directory where its oldest file
    would be) fails the write that needed the room, as before; the files that did go
    are audited all the same."""
    audit = small_trail(tmp_path, max_devices=1)
    query(audit, OTHER, 0)
    first = audit.devices.path_of(OTHER)
    first.with_name(first.name + ".1").write_bytes(first.read_bytes())
    (first.with_name(first.name + ".2") / "stuck").mkdir(parents=True)
    query(audit, HOSTILE, 1)
    assert audit.failures == 1 and not first.exists()
    (record,) = [json.loads(line) for line in audit.path.read_text().splitlines()]
    (obj,) = record["ParticipantObjectIdentification"]
    assert obj["ParticipantObjectID"] == first.name and obj["ParticipantObjectName"] == OTHER
    assert {d["type"]: d["value"] for d in obj["ParticipantObjectDetail"]}["Files"] == "2"


def test_a_devices_own_traffic_never_prunes_another_devices_set(tmp_path: Path) -> None:
    """Sets are pruned only when a set is created, for an identity with none (named by
    the inner certificate, which a device cannot choose): with the sets at their bound, a
    device writing three sets' worth, rotating its own, prunes nothing, however idle the
    other device's set is."""
    audit = small_trail(tmp_path, max_devices=2)
    query(audit, OTHER, 0)
    os.utime(audit.devices.path_of(OTHER), (1000, 1000))  # idle since long ago
    for i in range(1, 1 + 3 * 3 * MAX_LINE_BYTES // 900):
        query(audit, HOSTILE, i)
    assert audit.devices.pruned == 0
    assert queries_of(read_events(audit.path), OTHER) == [0]


def test_read_events_merges_the_sets_in_time_order(tmp_path: Path) -> None:
    audit = small_trail(tmp_path)
    for i in range(30):
        if i % 3 == 0:
            audit.revocation(
                now=at(i), device=f"spiffe://hospital.test/device/main/r{i}", actor="x"
            )
        else:
            query(audit, OTHER if i % 3 == 1 else HOSTILE, i)
    events = read_events(audit.path)
    assert [e["EventIdentification"]["EventDateTime"] for e in events] == [
        at(i).isoformat(timespec="microseconds").replace("+00:00", "Z") for i in range(30)
    ]
    assert len(read_events(audit.path, limit=7)) == 7


def _old_event(i: int, kind: str, device: str) -> str:
    return json.dumps(
        {
            "kind": kind,
            "EventIdentification": {"EventDateTime": at(i).isoformat().replace("+00:00", "Z")},
            "ActiveParticipant": [{"UserID": device, "UserIsRequestor": True}],
        }
    )


def test_a_security_set_of_any_name_is_read_with_its_rotated_files(tmp_path: Path) -> None:
    """The security set is the path the caller gives: a name without the device sets'
    suffix (`audit.log`) is listed too, and its rotated files with it."""
    audit = AuditLog(tmp_path / "audit.log", source_id=AGENT, max_bytes=MAX_LINE_BYTES, keep=2)
    for i in range(20):  # 100 events (5 kinds), over 100 KB: more than one file
        security_events(audit, i)
    assert (tmp_path / "audit.log.1").exists()
    events = read_events(tmp_path / "audit.log")
    assert len(events) == 100
    assert [e["kind"] for e in events[:4]] == ["enrollment", "token_created", "renewal",
                                               "revocation"]  # fmt: skip


def test_a_trail_of_the_old_layout_is_still_read_with_the_new_sets(tmp_path: Path) -> None:
    """Before the split, every event was in audit.jsonl(.N): those files are the
    security set now, read (and merged) as they are."""
    path = tmp_path / AUDIT_FILE
    old = [_old_event(i, "query" if i % 2 else "enrollment", HOSTILE) for i in range(10)]
    (tmp_path / f"{AUDIT_FILE}.1").write_text("\n".join(old[:5]) + "\n")
    path.write_text("\n".join(old[5:]) + "\n")
    audit = small_trail(tmp_path)
    query(audit, OTHER, 10)
    audit.revocation(now=at(11), device=OTHER, actor="x")
    events = read_events(path)
    assert [e["kind"] for e in events] == [json.loads(x)["kind"] for x in old] + [
        "query",
        "revocation",
    ]
    page = query_audit(path, AuditFilter(kind="query"), page_size=100)
    assert [requestor(e) for e in page.events] == [OTHER] + [HOSTILE] * 5
    everything = query_audit(path, AuditFilter(), page_size=100)
    assert len(everything.events) == 12 and everything.events[0]["kind"] == "revocation"


def test_the_view_merges_the_sets_newest_first_and_pages_across_them(tmp_path: Path) -> None:
    audit = small_trail(tmp_path)
    for i in range(40):
        if i % 4 == 0:
            audit.renewal(now=at(i), device=OTHER, outcome=Outcome.SUCCESS)
        else:
            query(audit, [OTHER, HOSTILE, "spiffe://hospital.test/device/main/ws9"][i % 3], i)
    times = []
    for page in range(1, 5):
        result = query_audit(audit.path, AuditFilter(page=page), page_size=10)
        assert result.has_more == (page < 4)
        times += [e["EventIdentification"]["EventDateTime"] for e in result.events]
    assert times == sorted(times, reverse=True) and len(set(times)) == 40
    ws2 = query_audit(audit.path, AuditFilter(device="/ws2", kind="query"), page_size=100)
    assert ws2.events and all(requestor(e) == OTHER for e in ws2.events)


def test_a_flood_does_not_push_the_security_events_beyond_the_views_scan_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filtering on a security kind reads the security set only: the hostile device's
    newer queries, more than MAX_SCAN of them, are not in the way."""
    monkeypatch.setattr(auditview, "MAX_SCAN", 50)
    audit = small_trail(tmp_path)
    audit.revocation(now=at(0), device=OTHER, actor="x")
    for i in range(1, 101):
        query(audit, HOSTILE, i)
    result = query_audit(audit.path, AuditFilter(kind="revocation"))
    assert [e["kind"] for e in result.events] == ["revocation"] and not result.truncated
    merged = query_audit(audit.path, AuditFilter())
    assert merged.truncated and merged.scanned == 50  # the bound still holds


@pytest.mark.parametrize("newest_first", [False, True])
def test_readers_take_small_chunks_skip_an_oversized_line_and_follow_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, newest_first: bool
) -> None:
    monkeypatch.setattr(audit_files, "READ_CHUNK", 1000)  # lines span several chunks
    audit = AuditLog(tmp_path / AUDIT_FILE, source_id=AGENT, max_bytes=MAX_LINE_BYTES, keep=50)
    for i in range(200):
        audit.revocation(now=at(i), device=f"spiffe://h/device/main/r{i}", actor="a" * 300)
    with audit.path.open("ab") as f:  # a damaged line, far longer than any event
        f.write(b"x" * (audit_files.MAX_READ_LINE + 500) + b"\n")
    audit.revocation(now=at(200), device="spiffe://h/device/main/r200", actor="a")
    reader: Iterator[dict[str, Any] | None] = merged_events([audit.path], newest_first=newest_first)
    first = next(reader)
    for i in range(201, 400):  # rotations while the reader is half way
        audit.revocation(now=at(i), device=f"spiffe://h/device/main/r{i}", actor="a" * 300)
    seen = [first, *reader]
    assert None not in seen  # the long line skipped, no fragment of it read as a line
    names = [str(e["ParticipantObjectIdentification"][0]["ParticipantObjectID"]) for e in seen if e]
    expected = [f"spiffe://h/device/main/r{i}" for i in range(201)]
    assert names == (expected[::-1] if newest_first else expected)


def test_max_devices_is_read_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("audit:\n  max_devices: 12\n")
    assert read_audit_settings(open_config(cfg)).max_devices == 12
    cfg.write_text("audit:\n  keep: 3\n")
    assert read_audit_settings(open_config(cfg)).max_devices == DEFAULT_MAX_DEVICES
    for bad in (0, 4097, 100_000):  # 4,096 at most: every page lists every set
        cfg.write_text(f"audit:\n  max_devices: {bad}\n")
        with pytest.raises(ConfigError, match=r"audit\.max_devices"):
            read_audit_settings(open_config(cfg))
    cfg.write_text("audit:\n  max_devices: 4096\n")
    assert read_audit_settings(open_config(cfg)).max_devices == 4096


def test_a_device_filter_naming_one_device_reads_its_set_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another device's flood, newer and more than MAX_SCAN lines, used to be in the way
    of a device filter (a substring over every set). Naming one device (its ID) reads
    that device's set and the security set only, and matches that device exactly."""
    monkeypatch.setattr(auditview, "MAX_SCAN", 50)
    audit = small_trail(tmp_path)
    audit.revocation(now=at(0), device=OTHER, actor="x")
    query(audit, OTHER, 1)
    query(audit, OTHER + "0", 2)  # ws20: its ID holds ws2's
    for i in range(3, 103):
        query(audit, HOSTILE, i)
    named = query_audit(audit.path, AuditFilter(device=OTHER))
    assert [(e["kind"], requestor(e)) for e in named.events] == [
        ("query", OTHER),
        ("revocation", "x"),
    ]
    assert not named.truncated and named.scanned == 2  # the security set and ws2's
    only_queries = query_audit(audit.path, AuditFilter(device=OTHER, kind="query"))
    assert [requestor(e) for e in only_queries.events] == [OTHER]
    substring = query_audit(audit.path, AuditFilter(device="/ws2"))  # not one device
    assert substring.truncated and substring.scanned == 50 and not substring.events


def write_device_sets(
    path: Path, count: int, *, lines: int = 1, start: datetime, step: timedelta, pad: int = 0
) -> None:
    """`count` device sets written as the trail writes them, fast: event `seq` = j *
    count + n (the sets interleaved) is line j of set n, at start + seq x step, and each
    file's last write is its last event's time."""
    directory = device_dir(path)
    directory.mkdir(mode=0o700)
    for n in range(count):
        device = f"spiffe://hospital.test/device/main/ws{n}"
        seqs = [j * count + n for j in range(lines)]
        body = "".join(
            json.dumps(
                {
                    "kind": "query",
                    "EventIdentification": {
                        "EventDateTime": (start + s * step).isoformat().replace("+00:00", "Z")
                    },
                    "ActiveParticipant": [{"UserID": device, "UserIsRequestor": True}],
                    "seq": s,
                    "pad": "p" * pad,
                }
            )
            + "\n"
            for s in seqs
        )
        file = directory / device_set_name(device)
        file.write_text(body)
        last = (start + seqs[-1] * step).timestamp()
        os.utime(file, (last, last))


def sets_read_by(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the sets whose files are read from now on."""
    names: set[str] = set()
    real = audit_files._read_if

    def reading(path: Path, *args: Any) -> bytes | None:
        names.add(path.name.split(".jsonl")[0])
        return real(path, *args)

    monkeypatch.setattr(audit_files, "_read_if", reading)
    return names


def test_a_page_over_thousands_of_device_sets_reads_the_recent_ones_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view used to glob the device directory once per set (sets x entries) and open
    every set at once: 2,000 sets took 13 s and 267 MiB a page. A set is opened only
    once the merge reaches its last write, at most MAX_OPEN_SETS at once."""
    import tracemalloc

    path = tmp_path / AUDIT_FILE
    start = datetime.now(dt.UTC) - timedelta(days=3)
    write_device_sets(path, 2000, start=start, step=timedelta(minutes=1))
    read = sets_read_by(monkeypatch)
    tracemalloc.start()
    try:
        page = query_audit(path, AuditFilter(), page_size=50)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e["seq"] for e in page.events] == list(range(1999, 1949, -1)) and page.has_more
    # The 51 newest and those written within MTIME_SLACK (10 min) of the 51st: not 2,000.
    assert len(read) <= 51 + 10 + 1, len(read)
    assert peak < 4 * 1024 * 1024, peak  # ~1 MiB: the listing, a few numbers a set


def test_a_scan_of_every_set_holds_at_most_max_open_sets_of_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that matches nothing reads every set to the end, their events
    interleaved: every set at once, each with a 64 KiB chunk and its lines, was ~134
    KiB a set in memory."""
    import tracemalloc

    path = tmp_path / AUDIT_FILE
    start = datetime.now(dt.UTC) - timedelta(days=1)
    sets, lines = 96, 66  # ~1 KiB lines: each set more than READ_CHUNK
    write_device_sets(path, sets, lines=lines, start=start, step=timedelta(seconds=1), pad=900)
    tracemalloc.start()
    try:
        page = query_audit(path, AuditFilter(kind="transfer_end"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert page.scanned == sets * lines and not page.events and not page.truncated
    # MAX_OPEN_SETS x (READ_CHUNK + MAX_READ_LINE): 32 x 192 KiB (~1.3 MiB measured)
    assert peak < 6 * 1024 * 1024, peak


@pytest.mark.parametrize("newest_first", [True, False])
def test_a_merge_that_parks_sets_keeps_the_time_order_and_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, newest_first: bool
) -> None:
    """Three sets read at once out of twelve, small chunks, rotated files, a torn line:
    each parked set is resumed at the line it had not merged yet."""
    monkeypatch.setattr(audit_files, "MAX_OPEN_SETS", 3)
    monkeypatch.setattr(audit_files, "READ_CHUNK", 700)
    monkeypatch.setattr(audit_files, "FIRST_CHUNK", 300)
    path = tmp_path / AUDIT_FILE
    start = datetime.now(dt.UTC) - timedelta(days=1)
    write_device_sets(path, 12, lines=30, start=start, step=timedelta(seconds=1), pad=100)
    directory = device_dir(path)
    for file in sorted(directory.iterdir())[:4]:  # its first half rotated into .1
        content = file.read_bytes().splitlines(keepends=True)
        file.with_name(file.name + ".1").write_bytes(b"".join(content[:15]))
        file.write_bytes(b"".join(content[15:]) + b'{"torn\n')
    events = list(merged_events(audit_files.trail_sets(path), newest_first=newest_first))
    assert events.count(None) == 4
    seqs = [e["seq"] for e in events if e is not None]
    assert seqs == sorted(range(12 * 30), reverse=newest_first)
