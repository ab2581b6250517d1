"""The IT pages' pieces without a server: sessions and their expiry, the failed-login
limiter, the scrypt password file, escaping, the audit view's filters and bounds, and the
`it_pages:` config section's errors. Time is a fake clock everywhere."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from relay.agent.authority import DeviceAuthority
from relay.agent.config import AgentConfig, load_agent_config
from relay.agent.itpages import passwords
from relay.agent.itpages.admin_cli import passwd
from relay.agent.itpages.app import allowed_hosts, host_allowed
from relay.agent.itpages.auditview import AuditFilter, query_audit
from relay.agent.itpages.auth import LocalAuthenticator, LoginLimiter, RefusalSampler
from relay.agent.itpages.html import Html, esc, render
from relay.agent.itpages.server import ItPagesServer
from relay.agent.itpages.sessions import SessionStore
from relay.agent.itpages.settings import read_it_pages_settings
from relay.agent.itpages.views import audit_page, code_form, devices_page, login_page
from relay.agent.registry import DeviceRow
from relay.ops.config import Address, ConfigError, Reader
from tests.pki_helpers import SitePki, make_pki

FAST = 10  # log2 N for test hashes: the format allows it, the checks take a millisecond


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- sessions


def test_session_ids_are_random_and_lookups_restart_the_idle_clock() -> None:
    clock = Clock()
    store = SessionStore(idle=60, max_age=600, max_sessions=10, clock=clock)
    a, b = store.create("carol"), store.create("carol")
    assert a.id != b.id and a.csrf != b.csrf and len(a.id) >= 40
    clock.t += 59
    assert store.get(a.id) is a  # used: idle clock restarts
    clock.t += 59
    assert store.get(a.id) is a
    assert store.get(b.id) is None  # 118 s idle
    assert store.get("nope") is None and store.get(None) is None


def test_absolute_expiry_ends_a_busy_session() -> None:
    clock = Clock()
    store = SessionStore(idle=60, max_age=100, max_sessions=10, clock=clock)
    s = store.create("carol")
    for _ in range(3):
        clock.t += 30
        assert store.get(s.id) is s
    clock.t += 10  # 100 s after login
    assert store.get(s.id) is None
    assert len(store) == 0


def test_session_count_is_bounded_and_logout_drops() -> None:
    clock = Clock()
    store = SessionStore(idle=60, max_age=600, max_sessions=3, clock=clock)
    first = store.create("a")
    others = [store.create(u) for u in "bc"]
    clock.t += 1
    store.get(first.id)  # most recently used now
    store.create("d")  # pushes out the least recently used: b
    assert len(store) == 3
    assert store.get(others[0].id) is None and store.get(first.id) is first
    assert store.drop(first.id) is first
    assert store.get(first.id) is None


# -- the login limiter


def test_limiter_blocks_a_user_after_its_failures_and_forgets_them_later() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_per_user=3, max_per_source=100, window=60, clock=clock)
    for i in range(3):
        assert not limiter.blocked(f"10.0.0.{i}", "Carol")
        limiter.failed(f"10.0.0.{i}", "carol")
    assert limiter.blocked("10.9.9.9", "carol")  # from any address, any case
    assert not limiter.blocked("10.9.9.9", "dave")
    clock.t += 61
    assert not limiter.blocked("10.9.9.9", "carol")


def test_limiter_blocks_a_source_trying_many_users_and_success_clears_the_user() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_per_user=3, max_per_source=5, window=60, clock=clock)
    for i in range(5):
        limiter.failed("10.0.0.1", f"user{i}")
    assert limiter.blocked("10.0.0.1", "someone-new")
    assert not limiter.blocked("10.0.0.2", "someone-new")
    limiter.failed("10.0.0.2", "x")
    limiter.failed("10.0.0.2", "x")
    limiter.succeeded("x")
    limiter.failed("10.0.0.3", "x")
    assert not limiter.blocked("10.0.0.4", "x")


def test_limiter_counts_an_attempt_from_before_its_check() -> None:
    """reserve() counts the attempt as failed at once, so attempts in flight together
    cannot all pass; release() takes it back when it did not fail."""
    clock = Clock()
    limiter = LoginLimiter(max_per_user=2, max_per_source=3, window=60, clock=clock)
    first = limiter.reserve("10.0.0.1", "carol")
    second = limiter.reserve("10.0.0.2", "Carol")
    assert first is not None and second is not None
    assert limiter.reserve("10.0.0.3", "carol") is None  # two in flight: the limit
    limiter.release(first)  # it succeeded (or the directory did not answer)
    limiter.release(first)  # twice: still one
    assert limiter.reserve("10.0.0.3", "carol") is not None
    assert limiter.reserve("10.0.0.4", "carol") is None
    assert limiter.reserve("10.0.0.9", "u1") and limiter.reserve("10.0.0.9", "u2")
    last = limiter.reserve("10.0.0.9", "u3")
    assert last is not None
    assert limiter.reserve("10.0.0.9", "u4") is None  # the address's 3 are taken
    limiter.release(last)
    assert limiter.reserve("10.0.0.9", "u4") is not None
    clock.t += 61
    assert limiter.reserve("10.0.0.4", "carol") is not None


def test_limiter_tracks_a_bounded_number_of_keys() -> None:
    limiter = LoginLimiter(max_keys=50, clock=Clock())
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", f"u{i}")
    assert len(limiter) <= 50


def test_refusal_sampler_audits_one_per_block_and_is_bounded() -> None:
    clock = Clock()
    at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    sampler = RefusalSampler(window=60, max_keys=3, clock=clock)
    assert sampler.refused(("user", "carol"), user="carol", peer="10.0.0.1", at=at) == (True, [])
    for i in range(5):
        assert sampler.refused(("user", "carol"), user="Carol", peer=f"10.0.0.{i}", at=at) == (
            False,
            [],
        )
    for i in range(3):  # more blocks than it keeps: the oldest goes, with its count
        first, ended = sampler.refused(("source", f"10.9.0.{i}"), user="x", peer="p", at=at)
        assert first
    assert [b.count for b in ended] == [5] and len(sampler) == 3
    assert "5 more refused logins for user carol" in ended[0].describe(60)
    assert "the last as 'Carol' from 10.0.0.4" in ended[0].describe(60)
    sampler.refused(("source", "10.9.0.2"), user="y", peer="p", at=at)
    clock.t += 61
    [ended_block] = sampler.due()
    assert ended_block.key == ("source", "10.9.0.2") and ended_block.count == 1
    assert len(sampler) == 0 and sampler.due() == [] and sampler.drain() == []
    sampler.refused(("user", "dave"), user="dave", peer="p", at=at)
    sampler.refused(("user", "dave"), user="dave", peer="p", at=at)
    assert [b.count for b in sampler.drain()] == [1] and len(sampler) == 0


def test_the_host_names_answered_are_the_address_and_the_certificate_names(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "it pages")])
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("IT.hospital.example"),
            x509.DNSName("*.agents.hospital.example"),
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False).sign(key, hashes.SHA256())
    )  # fmt: skip
    path = tmp_path / "it.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    hosts = allowed_hosts(Address("0.0.0.0", 443), 443, cert=path)
    for ok in ("it.hospital.example", "IT.Hospital.Example.:443", "10.1.2.3",
               "a1.agents.hospital.example:443"):  # fmt: skip
        assert host_allowed(ok, hosts), ok
    for refused in ("evil.example", "it.hospital.example:444", "0.0.0.0", "a.b.agents.hospital"
                    ".example", "agents.hospital.example", "127.0.0.1", "", None):  # fmt: skip
        assert not host_allowed(refused, hosts), refused
    local = allowed_hosts(Address("127.0.0.1", 9180), 9180)
    assert {"127.0.0.1:9180", "localhost:9180", "[::1]:9180"} == local
    assert host_allowed("[::1]:9180", local) and not host_allowed("[::1]", local)


# -- the password file


def test_password_file_round_trip_and_no_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    assert passwords.set_password(path, "carol", "correct horse battery", log2_n=FAST)
    assert not passwords.set_password(path, "carol", "another long secret", log2_n=FAST)
    passwords.set_password(path, "dave", "dave's long password", log2_n=FAST)
    text = path.read_text()
    assert "horse" not in text and "secret" not in text and "dave's" not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    admins = passwords.read_admins(path)
    assert set(admins) == {"carol", "dave"}
    assert passwords.verify_password(admins["carol"], "another long secret")
    assert not passwords.verify_password(admins["carol"], "correct horse battery")
    dummy = passwords.dummy_like(admins.values())
    assert not passwords.verify_password(None, "anything at all", dummy=dummy)
    # the same password hashes differently each time (salt)
    assert passwords.hash_password("x" * 12, log2_n=FAST) != passwords.hash_password(
        "x" * 12, log2_n=FAST
    )


def test_password_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    path.write_text("# comment\n\ncarol:plaintext-password\n")
    with pytest.raises(passwords.PasswordFileError, match=r"admins:3: not an entry"):
        passwords.read_admins(path)
    path.write_text("carol:scrypt$30$8$1$AAAA$AAAA\n")  # N = 2^30: refused, not computed
    with pytest.raises(passwords.PasswordFileError, match=r"admins:1"):
        passwords.read_admins(path)
    path.write_bytes(b"x" * (passwords.MAX_FILE_BYTES + 1))
    with pytest.raises(passwords.PasswordFileError, match="larger than"):
        passwords.read_admins(path)
    with pytest.raises(passwords.PasswordFileError, match="cannot read"):
        passwords.read_admins(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 12"):
        passwords.set_password(tmp_path / "new", "carol", "short")
    with pytest.raises(ValueError, match="not an admin name"):
        passwords.set_password(tmp_path / "new", "<carol>", "long enough password")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_admins_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO: open() waited forever (the agent's start, each login, `relay it-admin
    passwd`); a device such as /dev/null was replaced by a regular file by passwd."""
    fifo = tmp_path / "admins"
    os.mkfifo(fifo)
    with pytest.raises(passwords.PasswordFileError, match="admins: not a regular file"):
        passwords.read_admins(fifo)
    with pytest.raises(passwords.PasswordFileError, match="not a regular file"):
        passwords.set_password(fifo, "carol", "correct horse battery", log2_n=FAST)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # left as it was


async def test_local_authenticator(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    passwords.set_password(path, "carol", "correct horse battery", log2_n=FAST)
    auth = LocalAuthenticator(path)
    assert (await auth.authenticate("carol", "correct horse battery")).ok
    wrong = await auth.authenticate("carol", "correct horse batterY")
    assert (wrong.result, wrong.detail) == ("refused", "wrong password")
    assert (await auth.authenticate("mallory", "correct horse battery")).result == "refused"
    path.write_text("broken\n")
    assert (await auth.authenticate("carol", "correct horse battery")).result == "unavailable"


def test_passwd_command_reads_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr(passwords, "LOG2_N", FAST)  # N=2^17 is 0.5-1 s a hash
    path = tmp_path / "admins"
    assert passwd(path, "carol", stdin=io.StringIO("a long enough password\n")) == 0
    assert "added IT admin 'carol'" in capsys.readouterr().out
    assert passwd(path, "carol", stdin=io.StringIO("short\n")) == 2
    assert "at least 12" in capsys.readouterr().err
    admins = passwords.read_admins(path)
    assert passwords.verify_password(admins["carol"], "a long enough password")


# -- escaping

EVIL = '<script>alert("x")</script>&\'"'


def test_render_escapes_everything_but_html_built_here() -> None:
    out = render("<p title={a}>{b}</p>", a=EVIL, b=Html("<b>ok</b>"))
    assert "<script>" not in out and "&lt;script&gt;" in out and "&quot;" in out
    assert "&#x27;" in out and "<b>ok</b>" in out
    assert esc(None) == "" and esc(Html("<i>")) == "<i>"


def test_pages_escape_what_users_and_the_audit_trail_bring() -> None:
    now = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
    row = DeviceRow("ws1", "main", now, None, now, "ab", now, 1, user=EVIL)
    pages = [
        login_page("tok", user=EVIL, error=EVIL),
        devices_page([row], now, user=EVIL, csrf="tok", notice=EVIL),
        code_form(user="carol", csrf="tok", directory=True, error=EVIL, device=EVIL, holder=EVIL),
    ]
    event = {
        "kind": "transfer_end",
        "user": EVIL,
        "EventIdentification": {"EventDateTime": EVIL, "EventOutcomeDescription": EVIL},
        "ActiveParticipant": [{"UserID": EVIL, "UserName": EVIL}],
        "ParticipantObjectIdentification": [{"ParticipantObjectID": EVIL}],
    }
    from relay.agent.itpages.auditview import AuditPage

    pages.append(
        audit_page(AuditPage([event], 1, False, 1, False), AuditFilter(device=EVIL), user="c",
                   csrf="tok")
    )  # fmt: skip
    for page in pages:
        assert "<script>" not in page
        assert "&lt;script&gt;" in page


# -- the audit view


def _event(i: int, kind: str, device: str, user: str = "") -> str:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC) + dt.timedelta(hours=i)
    event = {
        "kind": kind,
        "EventIdentification": {"EventDateTime": at.isoformat().replace("+00:00", "Z")},
        "ActiveParticipant": [{"UserID": f"spiffe://h/device/main/{device}"}],
        **({"user": user} if user else {}),
    }
    return json.dumps(event)


def test_audit_view_filters_pages_newest_first_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = [
        _event(i, "renewal" if i % 2 else "enrollment", f"ws{i % 3}", "alice" if i % 3 else "")
        for i in range(120)
    ]
    (tmp_path / "audit.jsonl.1").write_text("\n".join(lines[:60]) + "\nnot json\n")
    path.write_text("\n".join(lines[60:]) + "\n")
    first = query_audit(path, AuditFilter(), page_size=50)
    assert len(first.events) == 50 and first.has_more
    assert first.events[0]["EventIdentification"] == json.loads(lines[-1])["EventIdentification"]
    third = query_audit(path, AuditFilter(page=3), page_size=50)
    assert len(third.events) == 20 and not third.has_more
    ws1 = query_audit(path, AuditFilter(device="/ws1", kind="renewal"), page_size=500)
    assert ws1.events and all(e["kind"] == "renewal" for e in ws1.events)
    assert all(e["ActiveParticipant"][0]["UserID"].endswith("/ws1") for e in ws1.events)
    alice = query_audit(path, AuditFilter(user="alice"), page_size=500)
    assert len(alice.events) == 80
    since = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)  # hours 96..119
    recent = query_audit(path, AuditFilter(since=since), page_size=500)
    assert len(recent.events) == 24


def test_audit_view_stops_after_its_scan_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.agent.itpages import auditview

    monkeypatch.setattr(auditview, "MAX_SCAN", 30)
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(_event(i, "renewal", "ws1") for i in range(100)) + "\n")
    result = query_audit(path, AuditFilter(kind="enrollment"))
    assert result.truncated and result.scanned == 30 and not result.events


# -- config


def _read(tmp_path: Path, section: object, *, directory: bool = False, pki: bool = True) -> object:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"it_pages": section}))
    r = Reader.document(yaml.safe_load(path.read_text()), path)
    settings = read_it_pages_settings(r, has_directory=directory, has_pki=pki)
    r.done()
    return settings


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "c.crt").write_text("x")
    (tmp_path / "c.key").write_text("x")
    ok = _read(tmp_path, {"listen": "127.0.0.1:0", "admins_file": "admins"})
    assert ok is not None
    cases = [
        ({"listen": "0.0.0.0:9180", "admins_file": "a"}, {}, "it_pages.tls", "loopback"),
        ({"listen": "127.0.0.1:0"}, {}, "it_pages.admins_file", "relay it-admin passwd"),
        ({"listen": "127.0.0.1:0", "admins_file": "a"}, {"directory": True},
         "it_pages.admins_file", "admin_group"),
        ({"listen": "127.0.0.1:0", "admins_file": "a"}, {"pki": False}, "it_pages", "pki"),
        ({"listen": "127.0.0.1:0", "admins_file": "a", "session_idle": "9h"}, {},
         "it_pages.session_idle", "session_max"),
        ({"listen": "127.0.0.1:0", "admins_file": "a", "sesion_max": "1h"}, {},
         "it_pages.sesion_max", "unknown key"),
        ({"listen": "127.0.0.1:0", "admins_file": "a", "tls": {"cert": "c.crt"}}, {},
         "it_pages.tls.key", "missing"),
    ]  # fmt: skip
    for section, flags, key, words in cases:
        with pytest.raises(ConfigError) as info:
            _read(tmp_path, section, **flags)
        message = str(info.value)
        assert "agent.yaml" in message and key in message and words in message, message
    tls = _read(
        tmp_path, {"listen": "0.0.0.0:9180", "tls": {"cert": "c.crt", "key": "c.key"}},
        directory=True,
    )  # fmt: skip
    assert tls is not None


# -- the admins file at start


def agent_with_pages(
    tmp_path: Path, it_pages: Callable[[SitePki], str]
) -> tuple[AgentConfig, DeviceAuthority]:
    """An agent's config (site main, a new PKI under tmp_path) with `it_pages(pki)` as its
    `it_pages:` value, and its DeviceAuthority, open (the caller closes it)."""
    pki = make_pki(tmp_path / "pki")
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(
        "site: main\ngateways: ['127.0.0.1:1']\n"
        f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
        f"pki: {{ca_cert: {pki.ca}, ca_key: {pki.directory / 'ca.key'}}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"it_pages: {it_pages(pki)}\n"
    )
    config = load_agent_config(config_file)
    assert config.pki is not None
    authority = DeviceAuthority.open(
        site="main", state_dir=config.state_dir, ca_cert=config.pki.ca_cert,
        ca_key=config.pki.ca_key,
    )  # fmt: skip
    return config, authority


def _pages_server_with(tmp_path: Path, admins: Path) -> None:
    """Build the IT pages as the agent does at start (nothing listens)."""
    config, authority = agent_with_pages(
        tmp_path, lambda _: f"{{listen: '127.0.0.1:0', admins_file: {admins}}}"
    )
    try:
        ItPagesServer(config, authority, lambda _: None, CollectorRegistry())
    finally:
        authority.close()


@pytest.mark.parametrize("state", ["missing", "empty", "malformed"])
def test_an_admins_file_no_one_can_log_in_with_is_one_warning_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state: str
) -> None:
    """Not a start-up error: the file is re-read at each login, so `relay it-admin passwd`
    fixes it without a restart. But IT must learn why its logins fail (503) at start."""
    admins = tmp_path / "it-admins"
    if state != "missing":
        admins.write_text("# no one yet\n" if state == "empty" else "anna\n")
    with caplog.at_level("WARNING", logger="relay.agent.itpages.server"):
        _pages_server_with(tmp_path, admins)
    said = [r.getMessage() for r in caplog.records if r.name == "relay.agent.itpages.server"]
    assert len(said) == 1, said
    assert said[0].startswith(f"{tmp_path / 'agent.yaml'}: it_pages.admins_file: {admins}")
    assert f"relay it-admin passwd --file {admins} --user NAME" in said[0]


def test_an_admins_file_with_an_admin_starts_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admins = tmp_path / "it-admins"
    passwords.set_password(admins, "carol", "correct horse battery", log2_n=FAST)
    with caplog.at_level("WARNING", logger="relay.agent.itpages.server"):
        _pages_server_with(tmp_path, admins)
    assert not [r for r in caplog.records if r.name == "relay.agent.itpages.server"]


#: Entries as `relay it-admin passwd` writes them now (N=2^17) and wrote them before
#: 2026-12 (N=2^15), both for "correct horse battery".
ENTRY_2_17 = "scrypt$17$8$1$Wq1p7jfMbG50q4xPraOeJg$928yk4LKZqdkfGboUm404iyoJMxzvvnGMknZWzaMxK0"
ENTRY_2_15 = "scrypt$15$8$1$dQ1t4fsM/jD7dHAiMEoh/Q$wb/xaU0E8XrTq67wL4giZa8HnkWXSpyb9YR4a13vsmk"


async def test_entries_at_n_2_17_log_in_and_older_ones_still_do(tmp_path: Path) -> None:
    """N=2^17 (OWASP's scrypt minimum) takes 128 MiB: above hashlib's maxmem of the old
    code (64 MiB), whose check raised there. Entries written with N=2^15 keep working:
    each names its parameters."""
    path = tmp_path / "admins"
    path.write_text(f"carol:{ENTRY_2_17}\ndave:{ENTRY_2_15}\n")
    auth = LocalAuthenticator(path)
    assert (await auth.authenticate("carol", "correct horse battery")).ok
    assert (await auth.authenticate("dave", "correct horse battery")).ok
    assert passwords.LOG2_N == 17 and passwords.MAX_HASH_MEMORY == 128 << 20


def test_an_entry_costlier_than_a_check_may_be_is_refused_when_read(tmp_path: Path) -> None:
    """N=2^18 passed the old bounds (2^10-2^20) but not hashlib's maxmem: every login of
    that admin raised (a 500). Now the file says which line asks too much (503)."""
    path = tmp_path / "admins"
    path.write_text("carol:scrypt$18$8$1$AAAA$AAAA\n")
    with pytest.raises(passwords.PasswordFileError, match=r"admins:1: .* at most 128 MiB"):
        passwords.read_admins(path)
    path.write_text("carol:scrypt$20$1$1$AAAA$AAAA\n")  # 128 * r * N = 128 MiB: accepted
    assert set(passwords.read_admins(path)) == {"carol"}


def test_an_unknown_name_is_checked_at_the_cost_of_the_files_entries() -> None:
    """The dummy an unknown name's password is checked against: the parameters most of
    the file's entries have (a tie: the costliest), so a file of N=2^15 entries does not
    answer an unknown name 4 times slower at the new N=2^17."""

    def params(dummy: str) -> tuple[str, ...]:
        return tuple(dummy.split("$")[1:4])

    assert params(passwords.dummy_like([])) == ("17", "8", "1")
    assert params(passwords.dummy_like([ENTRY_2_15, ENTRY_2_15, ENTRY_2_17])) == ("15", "8", "1")
    assert params(passwords.dummy_like([ENTRY_2_15, ENTRY_2_17])) == ("17", "8", "1")
    fast = passwords.hash_password("x" * 12, log2_n=FAST)
    dummy = passwords.dummy_like([fast, "not an entry"])
    assert params(dummy) == (str(FAST), "8", "1")
    assert not passwords.verify_password(None, "x" * 12, dummy=dummy)
    assert not passwords.verify_password(dummy, "x" * 12)  # no password matches it
