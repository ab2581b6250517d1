"""Issue 4 end to end: enrollment, refusals, renewal, revocation and the agent's state,
with every process started from the CLI on 127.0.0.1 (see enroll_chain.py).

One site for the module: gateways `ga` and `gb`, one agent linked to both, an echo
service behind the agent. The gateway rate-limits enrollment attempts per source address
and every attempt here comes from 127.0.0.1, so attempts that are not about the rate
limit go through `enroll_admitted` (which waits for the limit to let it through; a
turned-away attempt never reaches the agent).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay.ops import privatefiles
from relay.trust import pki
from relay.workstation.service import EXIT_REVOKED, REVOKED_MESSAGE
from tests.e2e.chain import HOST, RELAY, relay_cli
from tests.e2e.enroll_chain import (
    RATE_LIMITED,
    SITE,
    TRUST_DOMAIN,
    Conversation,
    EchoServer,
    Site,
    SyslogCollector,
    crafted_argv,
    echo_once,
    enroll_admitted,
    enroll_cli,
    forge,
    metric,
    retarget,
    running_site,
    serial_of,
    token_id,
    wait_for,
)

REVOCATION_BOUND = 2.0  # seconds, from the issue
RENEWAL_LIFETIME = "6s"  # renewed every ~4 s
RENEWALS = 3


def device_uri(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/device/{SITE}/{name}"


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, echo: EchoServer) -> Iterator[Site]:
    with running_site(tmp_path_factory.mktemp("site"), echo) as s:
        # The site's own PKI gives the syslog collector a certificate the agent trusts.
        collector = SyslogCollector(s.pki_dir / "gateway.crt", s.pki_dir / "gateway.key")
        s.syslog_port = collector.port
        s.collector = collector
        s.write_agent_config()
        s.start("ga", "gb", "agent")
        s.wait_routed("ga", "gb")
        yield s
        s.stop_all()
        collector.stop()


@dataclass
class Enrolled:
    name: str
    code: str
    identity: Path
    result: subprocess.CompletedProcess[str]


def enroll_and_start(site: Site, name: str, gateway: str, *, via: str | None = None) -> Enrolled:
    """token create -> relay enroll -> a workstation on that identity, linked to `gateway`."""
    code = site.token(name, gateway=via or gateway)
    identity = site.tmp / f"id-{name}"
    done = enroll_admitted(code, identity)
    assert done.returncode == 0, done.stderr + site.logs("agent")
    site.add_workstation(name, identity, gateway).start()
    site.wait_echo(name)
    return Enrolled(name, code, identity, done)


@pytest.fixture(scope="module")
def ws_ok(site: Site) -> Enrolled:
    return enroll_and_start(site, "ws-ok", "ga")


def one_line_refusal(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """`relay enroll` failed as it must: exit 2, one line on stderr, nothing on stdout."""
    message = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert "\n" not in message and message.startswith("relay enroll: "), message
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in message, message
    return message


def enrollment_events(site: Site, result: str) -> list[dict[str, Any]]:
    return [
        e
        for e in site.audit()
        if e["kind"] == "enrollment"
        and e["EventIdentification"]["EventOutcomeDescription"].startswith(f"{result}:")
    ]


def refused_everywhere(
    site: Site,
    done: subprocess.CompletedProcess[str],
    result: str,
    gateway: str,
    before: tuple[float, int],
    *fragments: str,
) -> None:
    """One line on the PC, one more audit event at the agent, one more in the metric
    (`before`: the metric and the number of such audit events before the attempt)."""
    before_metric, before_audit = before
    one_line_refusal(done, *fragments)
    events = enrollment_events(site, result)
    assert len(events) == before_audit + 1, events
    assert events[-1]["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert events[-1]["ActiveParticipant"][0]["NetworkAccessPointID"] == HOST
    # The agent reports the result to the gateway after answering the PC.
    wait_for(
        lambda: (
            site.gateway_metric(gateway, "relay_enrollments", result=result) == before_metric + 1
        ),
        f"relay_enrollments_total{{result={result!r}}} on {gateway}",
        within=5.0,
    )


def counts(site: Site, gateway: str, result: str) -> tuple[float, int]:
    return (
        site.gateway_metric(gateway, "relay_enrollments", result=result),
        len(enrollment_events(site, result)),
    )


# --- 1. the whole flow ----------------------------------------------------------------


def test_token_enroll_and_the_workstation_works(site: Site, ws_ok: Enrolled) -> None:
    out = ws_ok.result.stdout.strip()
    assert out.startswith(f"enrolled as {device_uri('ws-ok')}") and "\n" not in out
    assert ws_ok.result.stderr == ""
    privatefiles.check_private(ws_ok.identity / "device.key")
    assert sorted(p.name for p in ws_ok.identity.iterdir()) == [
        "ca.crt",
        "device.crt",
        "device.key",
    ]
    payload = os.urandom(200_000)
    assert echo_once(site.forward_port("ws-ok"), payload) == payload
    row = site.device("ws-ok")
    assert row["status"] == "active" and row["serial"] == serial_of(ws_ok.identity)
    assert row["last_seen"] is not None  # the echo streams touched it
    assert site.gateway_metric("ga", "relay_enrollments", result="ok") >= 1
    kinds = [(e["kind"], e["EventIdentification"]["EventOutcomeIndicator"]) for e in site.audit()]
    assert ("token_created", 0) in kinds and ("enrollment", 0) in kinds
    assert site.gateway_metric("ga", "relay_links", role="device", site=SITE) >= 1


def test_the_audit_trail_is_copied_to_syslog(site: Site, ws_ok: Enrolled) -> None:
    """What the agent audits also goes to the collector as RFC 5424 over TLS (events the
    CLI writes, such as token_created, are in the file only)."""
    collector = site.collector
    assert collector is not None

    def enrolled_in_syslog() -> bool:
        return any(
            e["kind"] == "enrollment"
            and e["ActiveParticipant"][0]["UserID"] == device_uri("ws-ok")
            and e["EventIdentification"]["EventOutcomeIndicator"] == 0
            for e in collector.events()
        )

    wait_for(enrolled_in_syslog, "the enrollment to reach the syslog collector", within=10.0)
    in_file = site.audit()
    assert all(event in in_file for event in collector.events())
    header = collector.messages[0].split(b" ", 7)
    assert header[0].startswith(b"<") and header[0].endswith(b">1") and header[3] == b"dmzrelay"


# --- 2. every bad case: one line on the PC, an audit event, a gateway metric ----------


def test_reused_code(site: Site, ws_ok: Enrolled) -> None:
    before = counts(site, "ga", "reused")
    done = enroll_admitted(ws_ok.code, site.tmp / "reused")
    refused_everywhere(site, done, "reused", "ga", before, "already used")


def test_expired_code(site: Site) -> None:
    code = site.token("ws-late", "--ttl", "1s")
    time.sleep(1.5)
    before = counts(site, "ga", "expired")
    done = enroll_admitted(code, site.tmp / "expired")
    refused_everywhere(site, done, "expired", "ga", before, "expired at")


def test_forged_code(site: Site) -> None:
    code = forge(site.token("ws-forged"))
    before = counts(site, "ga", "forged")
    done = enroll_admitted(code, site.tmp / "forged")
    refused_everywhere(site, done, "forged", "ga", before, "not valid")


def test_code_for_another_device(site: Site) -> None:
    code = site.token("ws-named")
    before = counts(site, "ga", "wrong_device")
    done = enroll_admitted(code, site.tmp / "other", "--device", "other")
    refused_everywhere(site, done, "wrong_device", "ga", before, "'ws-named', not 'other'")
    assert not (site.tmp / "other" / "device.key").exists()


@pytest.mark.parametrize(
    ("mode", "result", "fragment"),
    [
        ("wrong_identity", "wrong_identity", "another identity"),
        ("oversized", "oversized", "larger than 16384 bytes"),
        ("malformed_csr", "bad_csr", "malformed CSR"),
    ],
)
def test_bad_requests(site: Site, mode: str, result: str, fragment: str) -> None:
    """`relay enroll`'s code path with the CSR or the request tampered with."""
    code = site.token(f"ws-{mode.replace('_', '-')}", gateway="gb")
    out = site.tmp / mode
    before = counts(site, "gb", result)
    done = enroll_admitted(code, out, argv=crafted_argv(mode, code, out))
    refused_everywhere(site, done, result, "gb", before, fragment)
    if mode == "wrong_identity":  # a bad request does not spend the code
        done = enroll_admitted(code, out)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory, echo: EchoServer) -> Iterator[Site]:
    """Another PKI (same trust domain and site names), its gateway and its agent: what a
    man in the middle with his own CA would run."""
    with running_site(tmp_path_factory.mktemp("rogue"), echo, gateway_names=("gr",)) as s:
        s.start("gr", "agent")
        s.wait_routed("gr")
        yield s


def test_gateway_not_from_the_pinned_ca(site: Site, rogue: Site) -> None:
    code = site.token("ws-pinned")
    at_rogue = retarget(code, rogue.gateways["gr"].port)
    out = site.tmp / "pinned"
    aborted = rogue.gateway_metric("gr", "relay_enrollments", result="aborted")
    done = enroll_admitted(at_rogue, out)
    one_line_refusal(done, "the gateway's certificate is not from the pinned CA")
    assert not out.exists() or not any(out.iterdir())
    # The PC stopped before sending anything secret: the rogue side saw an aborted
    # attempt (its agent's audit trail, its gateway's metric) ...
    wait_for(
        lambda: rogue.gateway_metric("gr", "relay_enrollments", result="aborted") == aborted + 1,
        "the rogue gateway to count the aborted attempt",
        within=5.0,
    )
    rogue_events = [e for e in rogue.audit() if e["kind"] == "enrollment"]
    assert rogue_events and rogue_events[-1]["EventIdentification"][
        "EventOutcomeDescription"
    ].startswith("aborted:")
    assert all(token_id(code) not in str(e) for e in rogue.audit())
    # ... and the real site nothing; the code is unspent and works at the real gateway.
    assert all(token_id(code) not in str(e) for e in site.audit() if e["kind"] == "enrollment")
    done = enroll_admitted(retarget(code, site.gateways["gb"].port), out)
    assert done.returncode == 0, done.stderr


def test_too_many_attempts_from_one_address(site: Site, ws_ok: Enrolled) -> None:
    limited = site.gateway_metric("ga", "relay_enrollments", result="rate_limited")
    refused = site.gateway_metric("ga", "relay_refusals", reason="rate_limited")
    for _ in range(12):  # a burst of 5, then one every 6 s
        done = enroll_cli(ws_ok.code, site.tmp / "flood")
        if RATE_LIMITED in done.stderr:
            break
        one_line_refusal(done, "already used")
    one_line_refusal(done, RATE_LIMITED)
    assert site.gateway_metric("ga", "relay_enrollments", result="rate_limited") > limited
    assert site.gateway_metric("ga", "relay_refusals", reason="rate_limited") > refused
    # The gateway reports the flood to the agents, which audit it (no site is known yet).
    for _ in range(50):
        refusals = [e for e in site.audit() if e["kind"] == "auth_refused"]
        if any("rate_limited" in str(e) for e in refusals):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no auth_refused audit event for the rate-limited attempts")


# --- 4. revocation --------------------------------------------------------------------


def test_revocation_closes_links_within_two_seconds(site: Site, ws_ok: Enrolled) -> None:
    victim = enroll_and_start(site, "ws-rev", "ga", via="gb")
    # The same identity on a second PC process, linked to the other gateway.
    site.add_workstation("ws-rev-b", victim.identity, "gb").start()
    site.wait_echo("ws-rev-b")
    assert site.gateway_metric("ga", "relay_links", role="device", site=SITE) == 2
    refused_before = {
        g: site.gateway_metric(g, "relay_refusals", reason="revoked") for g in ("ga", "gb")
    }
    talks = {ws: Conversation(site.forward_port(ws)) for ws in ("ws-rev", "ws-rev-b", "ws-ok")}
    for talk in talks.values():
        talk.start()
    wait_for(lambda: all(t.transferred > 0 for t in talks.values()), "data to flow")

    done = relay_cli("device", "revoke", "ws-rev", "--config", str(site.agent_config))
    revoked_at = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == f"revoked {device_uri('ws-rev')}; the agent closes its links at every gateway"
    )

    def links_dropped() -> float | None:
        if site.gateway_metric("ga", "relay_links", role="device", site=SITE) == 1:
            return time.monotonic()
        return None

    dropped_at = wait_for(links_dropped, "ga to close the revoked link", within=10.0, every=0.02)
    for ws in ("ws-rev", "ws-rev-b"):
        talks[ws].join(10.0)
        assert talks[ws].failed_at is not None, f"{ws} still transfers"
    assert dropped_at - revoked_at <= REVOCATION_BOUND
    for ws in ("ws-rev", "ws-rev-b"):
        failed_at = talks[ws].failed_at
        assert failed_at is not None and failed_at - revoked_at <= REVOCATION_BOUND, ws
    assert talks["ws-ok"].failed_at is None, talks["ws-ok"].error  # another device carries on

    # Both PCs were told why (GOAWAY REVOKED on the live link): each says so in one plain
    # line and stops dialling, with its own exit status.
    for ws in ("ws-rev", "ws-rev-b"):
        assert_stopped_revoked(site, ws)

    # A PC that dials again with the revoked identity is told at once, by either gateway
    # (at the dial this time), and stops too; the agent audits the refused links.
    def refuses(gateway: str) -> bool:
        return (
            site.gateway_metric(gateway, "relay_refusals", reason="revoked")
            > (refused_before[gateway])
        )

    for gateway in ("ga", "gb"):
        site.add_workstation(f"ws-rev-{gateway}", victim.identity, gateway).start()
        assert_stopped_revoked(site, f"ws-rev-{gateway}")
        assert refuses(gateway)
    revocations = [e for e in site.audit() if e["kind"] == "revocation"]
    assert len(revocations) == 2  # by the CLI user, then pushed by the agent
    assert revocations[0]["ActiveParticipant"][0]["UserID"].startswith("cli:")
    wait_for(
        lambda: any(
            e["kind"] == "auth_refused"
            and e["ActiveParticipant"][0]["UserID"] == device_uri("ws-rev")
            and e["EventIdentification"]["EventOutcomeDescription"].startswith("revoked")
            for e in site.audit()
        ),
        "the agent to audit a refused link of the revoked device",
        within=10.0,
    )
    assert site.device("ws-rev")["status"] == "revoked"
    talks["ws-ok"].stop.set()
    talks["ws-ok"].join(10.0)
    assert talks["ws-ok"].failed_at is None, talks["ws-ok"].error

    # A gateway that restarts knows nothing, relearns the list from the agent, and still
    # refuses the device; the other device comes back.
    site.stop("ga", signal.SIGKILL)
    site.start("ga")
    site.wait_routed("ga")
    site.wait_echo("ws-ok")
    # The PC that was told records it (state_dir): started again it exits 3 at once,
    # without dialling. The same identity from another state directory (not told yet)
    # dials, and the restarted gateway refuses it.
    site.start("ws-rev-ga")
    proc = site.procs["ws-rev-ga"]
    assert proc.popen is not None and proc.popen.wait(10.0) == EXIT_REVOKED
    assert "this device was revoked at " in proc.output().splitlines()[-1]
    assert site.gateway_metric("ga", "relay_refusals", reason="revoked") == 0
    site.add_workstation("ws-rev-ga2", victim.identity, "ga").start()
    assert_stopped_revoked(site, "ws-rev-ga2")
    assert site.gateway_metric("ga", "relay_refusals", reason="revoked") == 1
    assert site.gateway_metric("ga", "relay_links", role="device", site=SITE) == 1


def assert_stopped_revoked(site: Site, ws: str) -> None:
    """`ws` exited EXIT_REVOKED after one plain error line, and dialled no more after it."""
    proc = site.procs[ws]
    assert proc.popen is not None
    try:
        status = proc.popen.wait(10.0)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{ws} still runs\n{site.logs(ws)}") from None
    assert status == EXIT_REVOKED, site.logs(ws)
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    # This run's lines: the log file is appended to, and a refusal at the first dial can be
    # logged before "workstation started", so the run starts after the previous one's end.
    stops = [i for i, e in enumerate(lines) if e["msg"] == "workstation stopped"]
    lines = lines[stops[-2] + 1 :] if len(stops) > 1 else lines
    errors = [e for e in lines if e["level"] in ("error", "critical")]
    assert [e["msg"] for e in errors] == [REVOKED_MESSAGE], site.logs(ws)
    after = lines[lines.index(errors[0]) + 1 :]
    assert not any(e["msg"] in ("dial failed", "link up") for e in after), site.logs(ws)


# --- 3. renewal -----------------------------------------------------------------------


def test_renewal_keeps_the_link_and_the_transfer(site: Site, ws_ok: Enrolled) -> None:
    site.stop("agent")
    site.write_agent_config(device_lifetime=RENEWAL_LIFETIME)
    site.start("agent")
    site.wait_routed("ga", "gb")
    renewed = enroll_and_start(site, "ws-renew", "gb")
    first_cert = site.tmp / "ws-renew-first.crt"
    shutil.copy(renewed.identity / "device.crt", first_cert)
    first = format(pki.load_cert(first_cert).serial_number, "x")
    talk = Conversation(site.forward_port("ws-renew"))
    talk.start()
    serials: list[tuple[str, int]] = [(first, talk.transferred)]

    def renewals_seen() -> bool:
        serial = serial_of(renewed.identity)
        if serial is not None and serial != serials[-1][0]:
            serials.append((serial, talk.transferred))
        return len(serials) > RENEWALS or talk.failed_at is not None

    wait_for(renewals_seen, f"{RENEWALS} renewals", within=60.0, every=0.1)
    time.sleep(0.5)  # data after the last renewal too
    talk.stop.set()
    talk.join(10.0)
    assert talk.failed_at is None, f"{talk.error}\n{site.logs('ws-renew', 'agent')}"
    progress = [moved for _, moved in serials] + [talk.transferred]
    assert progress == sorted(progress) and len(set(progress)) == len(progress), progress
    metrics = site.ws_metrics("ws-renew")
    assert metric(metrics, "relay_reconnects") == 0  # the one link carried all of it
    assert metric(metrics, "relay_links", role="gateway") == 1
    renewals = [
        e
        for e in site.audit()
        if e["kind"] == "renewal" and e["ActiveParticipant"][0]["UserID"] == device_uri("ws-renew")
    ]
    assert len(renewals) >= RENEWALS
    assert all(e["EventIdentification"]["EventOutcomeIndicator"] == 0 for e in renewals)
    row = site.device("ws-renew")
    assert row["certificates"] >= RENEWALS + 1 and row["serial"] == serial_of(renewed.identity)

    # The next dial presents the renewed identity: the first certificate has expired by
    # now, yet the workstation gets back in after its gateway restarts.
    assert pki.load_cert(first_cert).not_valid_after_utc < datetime.now(UTC)
    site.stop("gb")
    site.start("gb")
    site.wait_routed("gb")
    site.wait_echo("ws-renew")
    assert metric(metrics, "relay_reconnects") == 1
    site.stop("ws-renew")


# --- 5. the agent's state survives a restart ------------------------------------------


def test_registry_and_audit_survive_an_agent_restart(site: Site, ws_ok: Enrolled) -> None:
    before = {row["name"]: row for row in site.device_list()}
    audit_before = site.audit()
    assert before["ws-ok"]["last_seen"] is not None

    assert site.stop("agent") == 0
    site.start("agent")
    site.wait_routed("ga", "gb")
    site.wait_echo("ws-ok")  # traffic after the restart

    after = {row["name"]: row for row in site.device_list()}
    assert after.keys() == before.keys()
    for name, row in before.items():
        for key in ("enrolled_at", "revoked_at", "serial", "certificates"):
            assert after[name][key] == row[key], (name, key)
    assert after["ws-ok"]["last_seen"] > before["ws-ok"]["last_seen"]
    # The trail goes on in the same file: what was there is still there, then more.
    site.token("ws-after-restart")
    audit_after = site.audit()
    assert audit_after[: len(audit_before)] == audit_before
    assert audit_after[-1]["kind"] == "token_created"
    revoked = [name for name, row in before.items() if row["status"] == "revoked"]
    for name in revoked:  # still revoked for the restarted agent and the CLI
        assert after[name]["status"] == "revoked"
        done = relay_cli("token", "create", "--config", str(site.agent_config), "--device", name)
        assert done.returncode == 2 and "revoked" in done.stderr and done.stdout == ""


# --- the CLI's own errors -------------------------------------------------------------


def test_cli_errors_are_one_line(site: Site, tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    pki_dir = site.pki_dir
    bad.write_text(
        f"site: {SITE}\n"
        f"gateways: ['{HOST}:1']\n"
        f"tls: {{cert: {pki_dir}/agent.crt, key: {pki_dir}/agent.key, ca: {pki_dir}/ca.crt}}\n"
        f"pki: {{ca_cert: {pki_dir}/ca.crt, ca_key: {pki_dir}/ca.key, device_lifetime: 0s}}\n"
        f"state_dir: {tmp_path}/state\n"
    )
    for argv in (
        ("agent", "--config", str(bad)),
        ("token", "create", "--config", str(bad), "--device", "x"),
        ("device", "list", "--config", str(bad)),
    ):
        done = subprocess.run(
            [*RELAY, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, (argv, done.stderr)
        line = done.stderr.strip()
        assert "\n" not in line and "pki.device_lifetime" in line and str(bad) in line, line
    done = enroll_cli("DMZR1-AAAA", tmp_path / "x")
    one_line_refusal(done)


def test_enroll_keeps_an_identity_unless_forced(site: Site, tmp_path: Path) -> None:
    """An identity already in --dir is refused before the code is spent; --force replaces it."""
    code = site.token("ws-keep")
    identity = tmp_path / "identity"
    identity.mkdir()
    (identity / "device.key").write_text("the key in use\n")
    one_line_refusal(enroll_cli(code, identity), "already holds an identity", "--force")
    assert (identity / "device.key").read_text() == "the key in use\n"
    done = enroll_admitted(code, identity, "--force")  # the code was not spent
    assert done.returncode == 0, done.stderr
    assert serial_of(identity) is not None
    assert (identity / "device.key").read_text() != "the key in use\n"
