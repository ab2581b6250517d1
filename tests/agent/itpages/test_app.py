"""The IT pages served for real on 127.0.0.1 (aiohttp, plain HTTP and HTTPS), driven by
an HTTP client as a browser would: login, CSRF and origin checks, sessions and cookies,
enrollment codes (the code decodes, the registry and the audit trail have it), revocation
through the agent's revocation path (bodies pushed), the audit trail page, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
import yarl
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.agent.audit import AUDIT_FILE, MAX_LINE_BYTES, AuditLog, Outcome, read_events
from relay.agent.audit.budget import KIND_BURST, MAX_AGGREGATES, SOURCE_BURST
from relay.agent.authority import DeviceAuthority
from relay.agent.directory import Directory
from relay.agent.itpages import app, auditview, passwords
from relay.agent.itpages.app import ItPages, ItPagesMetrics, allowed_hosts, make_app
from relay.agent.itpages.auditview import AuditFilter, query_audit
from relay.agent.itpages.auth import (
    Authenticator,
    DirectoryAuthenticator,
    LocalAuthenticator,
    LoginLimiter,
    LoginResult,
)
from relay.agent.itpages.sessions import SessionStore
from relay.ops.config import Address
from relay.trust.codes import parse_code
from relay.trust.revocation import decode_revocations
from tests.agent.directory.blackhole import BlackHole
from tests.agent.directory.conftest import directory_section, read_settings
from tests.agent.directory.fakeldap import FakeLdap
from tests.interop.harness.slapd import ADMIN_GROUP, PASSWORDS, Slapd, user_dn
from tests.pki_helpers import HOST, SitePki, make_pki

PASSWORD = "correct horse battery"


@dataclass
class Pages:
    base: str
    it: ItPages
    authority: DeviceAuthority
    registry: CollectorRegistry
    pushed: list[list[bytes]] = field(default_factory=list)

    def audit(self, kind: str) -> list[dict[str, object]]:
        return [e for e in read_events(self.authority.audit.path) if e["kind"] == kind]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def _serve(
    tmp_path: Path,
    tls: bool,
    *,
    limiter: LoginLimiter | None = None,
    authenticator: Authenticator | None = None,
) -> AsyncIterator[Pages]:
    site: SitePki = make_pki(tmp_path / "pki")
    authority = DeviceAuthority.open(
        site="main", state_dir=tmp_path / "state", ca_cert=site.ca,
        ca_key=site.directory / "ca.key",
    )  # fmt: skip
    admins = tmp_path / "admins"
    passwords.set_password(admins, "carol", PASSWORD, log2_n=10)
    registry = CollectorRegistry()
    sessions = SessionStore(idle=600, max_age=3600, max_sessions=8)
    pushed: list[list[bytes]] = []
    it = ItPages(
        authority=authority,
        push=pushed.append,
        authenticator=LocalAuthenticator(admins) if authenticator is None else authenticator,
        sessions=sessions,
        limiter=LoginLimiter(max_per_user=3) if limiter is None else limiter,
        gateway=Address("relay.example.org", 443),
        tls=tls,
        directory=False,
        metrics=ItPagesMetrics(registry, sessions),
    )
    runner = web.AppRunner(make_app(it), access_log=None)
    await runner.setup()
    ctx = None
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(site.gateway.cert, site.gateway.key)  # names 127.0.0.1
    server = web.TCPSite(runner, HOST, 0, ssl_context=ctx)
    await server.start()
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    it.hosts = allowed_hosts(Address(HOST, port), port, cert=site.gateway.cert if tls else None)
    scheme = "https" if tls else "http"
    try:
        yield Pages(f"{scheme}://{HOST}:{port}", it, authority, registry, pushed)
    finally:
        await runner.cleanup()
        authority.close()


@pytest.fixture
async def pages(tmp_path: Path) -> AsyncIterator[Pages]:
    async for p in _serve(tmp_path, tls=False):
        yield p


class Browser:
    """An HTTP client that keeps cookies and sends Origin like a browser's form post."""

    def __init__(self, pages: Pages, ca: Path | None = None) -> None:
        self.pages = pages
        ssl_ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else False
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx),
        )

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.pages.base + path, allow_redirects=False) as r:
            return r.status, await r.text()

    async def post(
        self, path: str, data: dict[str, str], *, origin: str | None = "same",
        referer: str | None = None,
    ) -> aiohttp.ClientResponse:  # fmt: skip
        headers = {}
        if origin is not None:
            headers["Origin"] = self.pages.base if origin == "same" else origin
        if referer is not None:
            headers["Referer"] = referer
        r = await self.session.post(
            self.pages.base + path, data=data, headers=headers, allow_redirects=False
        )
        await r.read()
        return r

    async def login(self, user: str = "carol", password: str = PASSWORD) -> aiohttp.ClientResponse:
        _, body = await self.get("/login")
        return await self.post("/login", {"csrf": token(body), "user": user, "password": password})

    async def csrf(self) -> str:
        status, body = await self.get("/devices")
        assert status == 200, body
        return token(body)


def token(body: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', body)
    assert m is not None, body
    return m.group(1)


@pytest.fixture
async def browser(pages: Pages) -> AsyncIterator[Browser]:
    b = Browser(pages)
    yield b
    await b.close()


async def test_pages_need_a_login_and_a_wrong_password_is_refused_and_audited(
    pages: Pages, browser: Browser
) -> None:
    status, _ = await browser.get("/devices")
    assert status == 303
    r = await browser.login(password="wrong password!")
    assert r.status == 401
    assert "login refused" in await r.text()
    assert (await browser.get("/devices"))[0] == 303
    [event] = pages.audit("it_login")
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 4  # type: ignore[index]
    assert pages.metric("relay_it_logins_total", result="refused") == 1
    r = await browser.login()
    assert r.status == 303 and r.headers["Location"] == "/devices"
    cookie = r.headers.getall("Set-Cookie")
    session_cookie = next(c for c in cookie if c.startswith("relay-it="))
    assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
    assert (await browser.get("/devices"))[0] == 200
    assert pages.metric("relay_it_logins_total", result="ok") == 1
    ok = pages.audit("it_login")[-1]
    assert ok["ActiveParticipant"][0]["UserID"] == "it:carol"  # type: ignore[index]


async def test_login_without_its_csrf_token_or_from_another_site_is_refused(
    pages: Pages, browser: Browser
) -> None:
    _, body = await browser.get("/login")
    form = {"csrf": token(body), "user": "carol", "password": PASSWORD}
    assert (await browser.post("/login", {**form, "csrf": "forged"})).status == 403
    assert (await browser.post("/login", form, origin="https://evil.example")).status == 403
    assert (await browser.post("/login", form)).status == 303


async def test_the_login_form_survives_what_a_browser_loads_meanwhile(
    pages: Pages, browser: Browser
) -> None:
    """Chromium asks for /favicon.ico after the login page; that used to be redirected to
    /login, whose new pre-login token replaced the cookie of the form on screen, so every
    login from a real browser was refused for its CSRF token."""
    _, body = await browser.get("/login")
    shown = token(body)
    status, _ = await browser.get("/favicon.ico")
    assert status == 404
    status, again = await browser.get("/login")  # a second tab, a reload
    assert status == 200 and token(again) == shown
    form = {"csrf": shown, "user": "carol", "password": PASSWORD}
    assert (await browser.post("/login", form)).status == 303


async def test_a_login_cookie_the_agent_did_not_issue_is_refused(
    pages: Pages, browser: Browser
) -> None:
    """Double submit alone would take any cookie a client planted with a matching form
    field; the pre-login token must carry this process's MAC."""
    planted = "chosen-by-the-attacker"
    browser.session.cookie_jar.update_cookies(
        {pages.it.login_cookie: planted}, response_url=yarl.URL(pages.base)
    )
    form = {"csrf": planted, "user": "carol", "password": PASSWORD}
    assert (await browser.post("/login", form)).status == 403
    forged_mac = pages.it.login_token().split(".")[0] + ".AAAA"
    browser.session.cookie_jar.update_cookies(
        {pages.it.login_cookie: forged_mac}, response_url=yarl.URL(pages.base)
    )
    assert (await browser.post("/login", {**form, "csrf": forged_mac})).status == 403
    status, body = await browser.get("/login")  # a new, issued token replaces it
    assert status == 200 and token(body) not in (planted, forged_mac)
    assert pages.it.issued(token(body))
    assert not pages.audit("it_login")


async def test_every_post_needs_the_session_csrf_token_and_this_origin(
    pages: Pages, browser: Browser
) -> None:
    await browser.login()
    csrf = await browser.csrf()
    form = {"device": "ws1", "ttl": "1h"}
    refused = [
        await browser.post("/codes", form),  # no token
        await browser.post("/codes", {**form, "csrf": csrf[:-1] + "x"}),  # wrong token
        await browser.post("/codes", {**form, "csrf": csrf}, origin="http://evil.example"),
        await browser.post("/codes", {**form, "csrf": csrf}, origin="null"),
        await browser.post("/codes", {**form, "csrf": csrf}, origin=None),  # neither header
        await browser.post(
            "/codes", {**form, "csrf": csrf}, origin=None, referer="http://evil.example/x"
        ),
    ]
    assert [r.status for r in refused] == [403] * len(refused)
    assert pages.audit("token_created") == []
    r = await browser.post("/codes", {**form, "csrf": csrf}, origin=None,
                           referer=pages.base + "/codes/new")  # fmt: skip
    assert r.status == 200
    # another session's token is not this one's
    other = Browser(pages)
    try:
        await other.login()
        assert (await other.post("/codes", {**form, "device": "ws2", "csrf": csrf})).status == 403
    finally:
        await other.close()


async def test_refusals_are_logged_at_debug_with_the_reason_but_no_secret(
    pages: Pages, browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    await browser.login()
    csrf = await browser.csrf()
    session_id = next(iter(pages.it.sessions._sessions))
    with caplog.at_level(logging.DEBUG, logger="relay.agent.itpages.app"):
        wrong = csrf[:-1] + ("y" if csrf[-1] != "y" else "z")
        assert (await browser.post("/codes", {"device": "ws1", "csrf": wrong})).status == 403
        r = await browser.post("/codes", {"device": "ws1", "csrf": csrf}, origin="null")
        assert r.status == 403
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "wrong CSRF token" in lines[0] and "did not come from this site" in lines[1]
    assert "Origin 'null'" in lines[1]
    assert pages.it.cookie in lines[0]  # which cookies came, by name
    for line in lines:
        assert csrf not in line and wrong not in line and session_id not in line


async def test_create_a_code_shown_once_with_a_qr_code_and_audited(
    pages: Pages, browser: Browser
) -> None:
    await browser.login()
    csrf = await browser.csrf()
    r = await browser.post("/codes", {"device": "ws1", "ttl": "24h", "csrf": csrf})
    body = await r.text()
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    m = re.search(r'<code class="enroll" id="code">(DMZR1-[A-Z2-7]+)</code>', body)
    assert m is not None, body
    code = parse_code(m.group(1))
    assert (code.device, code.site, str(code.gateway)) == ("ws1", "main", "relay.example.org:443")
    assert "<svg" in body and "<script" not in body
    [event] = pages.audit("token_created")
    assert event["ActiveParticipant"][0]["UserID"] == "it:carol"  # type: ignore[index]
    assert pages.metric("relay_it_actions_total", action="code_created") == 1
    bad = await browser.post("/codes", {"device": "<b>x</b>", "ttl": "24h", "csrf": csrf})
    text = await bad.text()
    assert bad.status == 400 and "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text


async def test_revoke_goes_through_the_revocation_path_and_is_audited(
    pages: Pages, browser: Browser
) -> None:
    now = dt.datetime.now(dt.UTC)
    pages.authority.registry.record_certificate("ws1", 7, now, now + dt.timedelta(days=1), now)
    await browser.login()
    status, body = await browser.get("/devices")
    assert 'id="device-ws1"' in body and "active" in body
    status, confirm = await browser.get("/devices/revoke?device=ws1")
    assert status == 200 and 'id="confirm"' in confirm
    assert pages.authority.registry.is_revoked("ws1") is False  # the GET changes nothing
    r = await browser.post("/devices/revoke", {"device": "ws1", "csrf": token(confirm)})
    assert r.status == 200 and "revoked ws1" in await r.text()
    assert pages.authority.registry.is_revoked("ws1")
    [bodies] = pages.pushed
    update = decode_revocations(bodies[0])
    assert "spiffe://hospital.test/device/main/ws1" in update.devices
    by_admin = [
        e for e in pages.audit("revocation")
        if e["ActiveParticipant"][0]["UserID"] == "it:carol"  # type: ignore[index]
    ]  # fmt: skip
    assert len(by_admin) == 1
    again = await browser.post("/devices/revoke", {"device": "ws1", "csrf": token(confirm)})
    assert "already revoked" in await again.text() and len(pages.pushed) == 1
    missing = await browser.post("/devices/revoke", {"device": "nope", "csrf": token(confirm)})
    assert missing.status == 404


async def test_logout_ends_the_session(pages: Pages, browser: Browser) -> None:
    await browser.login()
    csrf = await browser.csrf()
    r = await browser.post("/logout", {"csrf": csrf})
    assert r.status == 303 and r.headers["Location"] == "/login"
    assert len(pages.it.sessions) == 0
    assert pages.audit("it_logout")
    assert (await browser.get("/devices"))[0] == 303


async def test_failed_logins_are_rate_limited_per_user(pages: Pages, browser: Browser) -> None:
    for _ in range(3):
        assert (await browser.login(password="not the password")).status == 401
    r = await browser.login()  # the right password, but too late
    assert r.status == 429
    assert pages.metric("relay_it_logins_total", result="rate_limited") == 1
    assert pages.audit("it_login")[-1]["EventIdentification"]["EventOutcomeDescription"].startswith(  # type: ignore[index]
        "rate_limited"
    )


async def test_audit_page_filters(pages: Pages, browser: Browser) -> None:
    await browser.login()
    csrf = await browser.csrf()
    await browser.post("/codes", {"device": "ws1", "ttl": "1h", "csrf": csrf})
    await browser.post("/codes", {"device": "ws2", "ttl": "1h", "csrf": csrf})
    status, body = await browser.get("/audit?kind=token_created&device=ws2")
    assert status == 200
    rows = re.findall(r'<tr class="event">.*?</tr>', body)
    assert len(rows) == 1 and "ws2" in rows[0]
    status, body = await browser.get("/audit?kind=it_login")
    assert len(re.findall(r'<tr class="event">', body)) == 1


async def test_https_cookies_are_secure_and_host_only(tmp_path: Path) -> None:
    async for pages in _serve(tmp_path, tls=True):
        b = Browser(pages, ca=tmp_path / "pki" / "ca.crt")
        try:
            r = await b.login()
            assert r.status == 303
            [cookie] = [c for c in r.headers.getall("Set-Cookie") if "relay-it=" in c]
            assert cookie.startswith("__Host-relay-it=")
            assert all(a in cookie for a in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"))
            assert "Domain" not in cookie
            assert (await b.get("/devices"))[0] == 200
            r = await b.post("/codes", {"device": "ws1", "ttl": "1h", "csrf": await b.csrf()},
                             origin="http://" + pages.base.removeprefix("https://"))  # fmt: skip
            assert r.status == 403  # http:// is another origin than https://
        finally:
            await b.close()


async def test_line_separators_in_a_login_name_neither_hide_nor_forge_events(
    pages: Pages, browser: Browser
) -> None:
    """The user field of the login form is anyone's: U+2028/U+2029/U+0085 in it must not
    split its audit event (the audit page and read_events used str.splitlines())."""
    name = 'bob\u2028{"kind":"forged"}\u2029x\x85y'
    assert (await browser.login(user=name, password="not the password")).status == 401
    [event] = read_events(pages.authority.audit.path)
    assert event["kind"] == "it_login"
    assert event["ActiveParticipant"][0]["UserID"] == f"it:{name}"
    await browser.login()
    status, body = await browser.get("/audit?kind=it_login")
    assert status == 200 and len(re.findall(r'<tr class="event">', body)) == 2
    page = query_audit(pages.authority.audit.path, AuditFilter())
    assert [e.get("kind") for e in page.events] == ["it_login", "it_login"]


async def test_concurrent_guesses_cannot_outrun_the_rate_limit(
    pages: Pages, browser: Browser
) -> None:
    """The limit is 3 failures for a name here: of 40 guesses sent at once, 3 are checked
    and the rest refused with 429, not all 40 checked before the first failure counts."""
    _, body = await browser.get("/login")
    csrf = token(body)

    async def guess(i: int) -> int:
        form = {"csrf": csrf, "user": "carol", "password": f"guess number {i}"}
        return (await browser.post("/login", form)).status

    statuses = await asyncio.gather(*(guess(i) for i in range(40)))
    assert sorted(statuses) == [401] * 3 + [429] * 37
    assert pages.metric("relay_it_logins_total", result="refused") == 3
    assert (await browser.login()).status == 429  # the right password: too late


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def descriptions(pages: Pages, kind: str = "it_login") -> list[str]:
    return [str(e["EventIdentification"]["EventOutcomeDescription"]) for e in pages.audit(kind)]  # type: ignore[index]


async def test_refused_logins_while_blocked_are_audited_once_then_counted(
    tmp_path: Path,
) -> None:
    """Each 429 used to write an audit event: anyone could fill the trail and push the
    oldest files (patient transfers) out of the rotation. The first refusal of a block
    is audited, the others are counted in one event when the window ends."""
    clock = Clock()
    limiter = LoginLimiter(max_per_user=3, window=900, clock=clock)
    async for pages in _serve(tmp_path, tls=False, limiter=limiter):
        b = Browser(pages)
        try:
            for _ in range(3):
                assert (await b.login(password="not the password")).status == 401
            for _ in range(30):
                assert (await b.login(password="still not it")).status == 429
            assert pages.metric("relay_it_logins_total", result="rate_limited") == 30
            limited = [d for d in descriptions(pages) if d.startswith("rate_limited")]
            assert limited == ["rate_limited: too many failed logins"]
            clock.t += 901  # the window ends: the next request writes the count
            assert (await b.get("/login"))[0] == 200
            summary = descriptions(pages)[-1]
            assert summary.startswith("rate_limited: 29 more refused logins"), summary
            assert "user carol" in summary
            assert len(pages.audit("it_login")) == 5
            assert (await b.login()).status == 303  # the failures are 15 minutes old
        finally:
            await b.close()


async def test_a_directory_that_does_not_answer_in_time_is_a_503(tmp_path: Path) -> None:
    """The login used to wait as long as the directory (and whatever queued before it)
    took; now it gives up after `login_timeout`, says so, and the page is a 503."""
    hole = await BlackHole().start()
    section = {"url": f"ldap://{HOST}:1", "start_tls": True, "bind_dn": "cn=relay",
               "user_base": "ou=people", "group": "cn=g", "admin_group": "cn=it"}  # fmt: skip
    (tmp_path / "directory.pw").write_text("secret\n")
    section["bind_password_file"] = str(tmp_path / "directory.pw")
    directory = Directory(hole.settings(read_settings(section, tmp_path), timeout=5.0))
    try:
        async for pages in _serve(
            tmp_path, tls=False, authenticator=DirectoryAuthenticator(directory)
        ):
            pages.it.login_timeout = 0.5
            b = Browser(pages)
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                r = await b.login("carol", "carol's password")
                assert loop.time() - t0 < 3.0  # not the directory's 5 s
                assert r.status == 503
                assert "the directory did not answer in time" in await r.text()
                assert pages.metric("relay_it_logins_total", result="unavailable") == 1
                [event] = pages.audit("it_login")
                assert event["EventIdentification"]["EventOutcomeIndicator"] == 8  # type: ignore[index]
                # not a failed login: the limit (3 here) is not spent by an outage
                for _ in range(3):
                    assert (await b.login("carol", "carol's password")).status == 503
                assert pages.metric("relay_it_logins_total", result="rate_limited") == 0
            finally:
                await b.close()
    finally:
        directory.close()
        await hole.close()


async def test_a_directory_that_answers_busy_is_a_503_not_a_failed_login(
    tmp_path: Path,
) -> None:
    """A directory answering the admin's bind with busy (51) used to be a wrong
    password: 401, counted by the failed-login limit, and after it IT was locked out
    (429) for the window, with the right password every time."""
    ldap = await FakeLdap(51, "server busy").start()
    directory = Directory(ldap.settings())
    limiter = LoginLimiter(max_per_user=3)
    try:
        async for pages in _serve(
            tmp_path, tls=False, limiter=limiter, authenticator=DirectoryAuthenticator(directory)
        ):
            b = Browser(pages)
            try:
                for _ in range(5):
                    r = await b.login("alice", "the right password")
                    assert r.status == 503
                    assert "the directory is unavailable; try again later" in await r.text()
                assert not limiter.blocked(HOST, "alice") and len(limiter) == 0
                assert pages.metric("relay_it_logins_total", result="unavailable") == 5
                assert pages.metric("relay_it_logins_total", result="rate_limited") == 0
                event = pages.audit("it_login")[-1]
                assert event["EventIdentification"]["EventOutcomeIndicator"] == 8  # type: ignore[index]
                assert "busy (51)" in descriptions(pages)[-1]
                ldap.user_bind = (0, "")  # the directory is back: the login goes through
                assert (await b.login("alice", "the right password")).status == 303
            finally:
                await b.close()
    finally:
        directory.close()
        await ldap.close()


async def test_an_admin_removed_from_the_admin_group_loses_the_session(
    slapd: Slapd, tmp_path: Path
) -> None:
    """Sessions are checked again against the directory (here at every request): out of
    the admin group, the session ends at the next request; a directory that cannot be
    reached ends nothing (IT would be locked out by an outage)."""
    settings = read_settings(directory_section(slapd, tmp_path, timeout="2s"), tmp_path)
    directory = Directory(settings)
    try:
        async for pages in _serve(
            tmp_path, tls=False, authenticator=DirectoryAuthenticator(directory)
        ):
            pages.it.sessions.recheck = 0.0
            b = Browser(pages)
            try:
                assert (await b.login("carol", PASSWORDS["carol"])).status == 303
                assert (await b.get("/devices"))[0] == 200  # checked: still an admin
                slapd.kill()
                assert (await b.get("/devices"))[0] == 200  # unreachable: kept
                slapd.start()
                csrf = await b.csrf()
                # (a groupOfNames keeps at least one member)
                slapd.modify(f"dn: {ADMIN_GROUP}\nchangetype: modify\nadd: member\n"
                             f"member: {user_dn('dave')}\n")  # fmt: skip
                slapd.remove_member("carol", ADMIN_GROUP)
                r = await b.post("/codes", {"device": "ws1", "ttl": "1h", "csrf": csrf})
                assert r.status == 403 and "no longer an IT admin" in await r.text()
                assert pages.audit("token_created") == []
                assert (await b.get("/devices"))[0] == 303  # the session is gone
                assert len(pages.it.sessions) == 0
                [ended] = descriptions(pages, "it_logout")
                assert "no longer an IT admin" in ended
            finally:
                await b.close()
    finally:
        directory.close()


async def test_a_local_admin_removed_from_the_admins_file_loses_the_session(
    pages: Pages, browser: Browser, tmp_path: Path
) -> None:
    await browser.login()
    pages.it.sessions.recheck = 0.0
    assert (await browser.get("/devices"))[0] == 200
    admins = tmp_path / "admins"
    admins.write_text("")  # carol's line removed (as by hand)
    passwords.set_password(admins, "dave", "dave's long password", log2_n=10)
    assert (await browser.get("/devices"))[0] == 303
    assert len(pages.it.sessions) == 0
    assert "no longer an IT admin" in descriptions(pages, "it_logout")[0]


@pytest.mark.parametrize("content", ["", "# IT admins: none yet\n\n"])
async def test_an_admins_file_with_no_admin_is_a_503_not_a_failed_login(
    tmp_path: Path, content: str
) -> None:
    """As a missing admins file: an empty or comment-only one was every login refused
    (401), counted by the failed-login limit (IT locked out, 429, once an admin was
    written) and audited as a refusal."""
    limiter = LoginLimiter(max_per_user=3)
    async for pages in _serve(tmp_path, tls=False, limiter=limiter):
        (tmp_path / "admins").write_text(content)
        b = Browser(pages)
        try:
            for _ in range(4):
                r = await b.login()
                assert r.status == 503
                assert "the password check is unavailable; try again later" in await r.text()
            assert not limiter.blocked(HOST, "carol") and len(limiter) == 0
            assert pages.metric("relay_it_logins_total", result="unavailable") == 4
            assert pages.metric("relay_it_logins_total", result="refused") == 0
            assert all("holds no admin" in d for d in descriptions(pages))
            passwords.set_password(tmp_path / "admins", "carol", PASSWORD, log2_n=10)
            assert (await b.login()).status == 303
        finally:
            await b.close()


async def test_a_request_naming_another_host_is_refused(pages: Pages, browser: Browser) -> None:
    """DNS rebinding: a page of evil.example whose name is made to resolve to the agent
    is same-origin with itself (Host, Origin and Referer all say evil.example); only the
    Host check tells it is not the IT pages' address."""
    port = pages.base.rsplit(":", 1)[1]
    evil = f"evil.example:{port}"
    async with browser.session.get(
        pages.base + "/login", headers={"Host": evil}, allow_redirects=False
    ) as r:
        assert r.status == 403 and "Host header" in await r.text()
    _, body = await browser.get("/login")
    form = {"csrf": token(body), "user": "carol", "password": PASSWORD}
    r = await browser.session.post(pages.base + "/login", data=form, allow_redirects=False,
                                   headers={"Host": evil, "Origin": f"http://{evil}"})  # fmt: skip
    assert r.status == 403 and len(pages.it.sessions) == 0
    for host in (f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}"):
        async with browser.session.get(pages.base + "/login", headers={"Host": host}) as ok:
            assert ok.status == 200, host
    assert (await browser.login()).status == 303


class Refusing:
    """Refuses every login at once (no scrypt): a flood costs the test nothing."""

    what = "the password check"

    async def authenticate(self, user: str, password: str) -> LoginResult:
        return LoginResult("refused", user, "wrong password")

    async def still_admin(self, user: str, stamp: str = "") -> bool | None:
        return False


def refusals_in(events: list[dict[str, Any]]) -> int:
    return sum(
        int(e["aggregate"]["count"]) if "aggregate" in e else 1
        for e in events
        if e["EventIdentification"]["EventOutcomeIndicator"]
    )


async def test_a_flood_of_failed_logins_cannot_rotate_the_security_set(tmp_path: Path) -> None:
    """From 20 addresses (the limiter lets each fail 20 times a window, varying the user
    name), 420 refused logins used to be 420 events: twice the smallest security set (64
    KiB and one older file), the earlier events rotated away. Now each address writes its
    first ones and every address together at most the kind's budget; the rest are
    counted into aggregates."""
    async for pages in _serve(tmp_path, tls=False, authenticator=Refusing()):
        (tmp_path / "small").mkdir()
        audit = pages.authority.audit = AuditLog(
            tmp_path / "small" / AUDIT_FILE,
            source_id="spiffe://hospital.test/agent/main",
            max_bytes=MAX_LINE_BYTES,
            keep=1,
        )
        at = dt.datetime.now(dt.UTC)
        audit.token_created(
            now=at, device="ws1", token_id="00" * 8, expires_at=at, actor="it:carol"
        )
        for n in range(20):
            connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{n + 2}", 0))
            async with aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True), connector=connector
            ) as client:
                async with client.get(pages.base + "/login") as r:
                    csrf = token(await r.text())
                statuses = []
                for i in range(21):
                    form = {"csrf": csrf, "user": f"user{n}-{i}", "password": "guess"}
                    async with client.post(
                        pages.base + "/login", data=form, headers={"Origin": pages.base}
                    ) as r:
                        statuses.append(r.status)
                assert statuses == [401] * 20 + [429]
        pages.it.flush_refusals(everything=True)
        audit.close()
        events = read_events(audit.path)
        assert events[0]["kind"] == "token_created", "rotated away"
        logins = [e for e in events if e["kind"] == "it_login"]
        assert refusals_in(logins) == 20 * 21
        assert len(logins) <= KIND_BURST + MAX_AGGREGATES + 1
        first = next(e for e in logins if "aggregate" in e)["aggregate"]
        assert first["source"] == "127.0.0.2" and first["count"] == 21 - SOURCE_BURST


async def test_the_audit_page_reads_one_devices_set_for_its_name(
    pages: Pages, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered device's name in the device filter names that device: its set and
    the security set are read, not another device's newer flood (more than MAX_SCAN)."""
    monkeypatch.setattr(auditview, "MAX_SCAN", 50)
    await browser.login()
    csrf = await browser.csrf()
    await browser.post("/codes", {"device": "ws2", "ttl": "1h", "csrf": csrf})
    at = dt.datetime.now(dt.UTC)
    pages.authority.registry.record_certificate("ws2", 1, at, at, at)
    audit = pages.authority.audit
    ws2 = "spiffe://hospital.test/device/main/ws2"
    audit.query(now=at, device=ws2, sop_class_uid="1.2", outcome=Outcome.SUCCESS)
    for _ in range(60):
        audit.query(
            now=at, device=ws2 + "0", sop_class_uid="1.2", outcome=Outcome.SUCCESS
        )  # ws20, whose name holds ws2's
    status, body = await browser.get("/audit?device=ws2")
    assert status == 200
    rows = re.findall(r'<tr class="event">.*?</tr>', body, re.S)
    kinds = [re.search(r'class="kind">(\w+)<', r).group(1) for r in rows]  # type: ignore[union-attr]
    assert kinds == ["query", "token_created"], kinds
    status, body = await browser.get("/audit?device=ws9")  # no such device: a substring
    assert status == 200 and not re.findall(r'<tr class="event">', body)


async def raw_status(pages: Pages, request: bytes) -> tuple[int, bytes]:
    """The status and the whole answer of `request` sent as bytes on its own connection
    (what no client library sends: bytes that are not UTF-8 in a header)."""
    host, port = pages.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("cookie", [b"abc.\xff\xfe", b"\xfe.\xff"])
async def test_a_login_cookie_that_is_not_ascii_is_refused_not_a_500(
    pages: Pages, browser: Browser, cookie: bytes
) -> None:
    """hmac.compare_digest raises TypeError for a str that is not ASCII: a pre-login
    cookie of bytes that are not UTF-8 (aiohttp keeps them as lone surrogates) made
    /login itself (and the login post) a 500."""
    host = pages.base.removeprefix("http://").encode()
    header = b"Cookie: " + pages.it.login_cookie.encode() + b"=" + cookie + b"\r\n"
    status, answer = await raw_status(
        pages, b"GET /login HTTP/1.1\r\nHost: " + host + b"\r\n" + header
        + b"Connection: close\r\n\r\n",
    )  # fmt: skip
    assert status == 200, answer
    issued = token(answer.decode())
    assert pages.it.issued(issued) and issued.encode() != cookie
    body = b"csrf=" + quote_from_bytes(cookie).encode() + b"&user=carol&password=x"
    status, answer = await raw_status(
        pages, b"POST /login HTTP/1.1\r\nHost: " + host + b"\r\n" + header
        + b"Origin: " + pages.base.encode() + b"\r\n"
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body,
    )  # fmt: skip
    assert status == 403, answer
    assert not pages.audit("it_login") and len(pages.it.sessions) == 0


async def test_a_form_that_does_not_read_is_a_400_and_a_big_one_a_413_with_the_headers(
    pages: Pages, browser: Browser
) -> None:
    """request.post() raised for bytes that are not UTF-8, an unknown charset, a
    multipart body without boundary or field name: a 500. And the 413 of a body too
    big came without the pages' headers (no CSP, no frame-ancestors)."""
    await browser.login()
    csrf = await browser.csrf()
    form = "application/x-www-form-urlencoded"
    bad: list[tuple[str, bytes]] = [
        (form, f"csrf={csrf}&device=\xff&ttl=1h".encode("latin-1")),
        (form + "; charset=no-such-charset", f"csrf={csrf}&device=ws1&ttl=1h".encode()),
        ("multipart/form-data", b"--x\r\n\r\nws1\r\n--x--\r\n"),  # no boundary
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data\r\n\r\nws1\r\n--x--\r\n'),  # no name
        ("multipart/form-data; boundary=x",
         b'--x\r\nContent-Disposition: form-data; name="device"\r\n'
         b"Content-Type: text/plain\r\n\r\n\xff\xfe\r\n--x--\r\n"),
    ]  # fmt: skip
    for path in ("/codes", "/login"):
        for content_type, body in bad:
            r = await browser.session.post(
                pages.base + path,
                data=body,
                headers={"Content-Type": content_type, "Origin": pages.base},
                allow_redirects=False,
            )
            text = await r.text()
            assert r.status == 400, (path, content_type, r.status, text)
            assert "the form could not be read" in text
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    big = {"csrf": csrf, "device": "ws1", "ttl": "1h", "pad": "x" * (app.MAX_BODY + 1)}
    r = await browser.post("/codes", big)
    assert r.status == 413 and "too large" in await r.text()
    assert r.headers["X-Frame-Options"] == "DENY" and "Content-Security-Policy" in r.headers
    assert pages.audit("token_created") == []
    ok = await browser.post("/codes", {"csrf": csrf, "device": "ws1", "ttl": "1h"})
    assert ok.status == 200  # as a control


async def test_a_login_ends_the_session_the_browser_held_before(
    pages: Pages, browser: Browser
) -> None:
    """A new id at each login, and the old one ended: it stayed valid (up to
    session_max) for whoever had copied it."""
    await browser.login()
    old = next(iter(pages.it.sessions._sessions))
    assert (await browser.login()).status == 303
    assert len(pages.it.sessions) == 1 and old not in pages.it.sessions._sessions
    thief = Browser(pages)
    try:
        thief.session.cookie_jar.update_cookies(
            {pages.it.cookie: old}, response_url=yarl.URL(pages.base)
        )
        assert (await thief.get("/devices"))[0] == 303
    finally:
        await thief.close()
    assert (await browser.get("/devices"))[0] == 200


async def test_a_new_password_ends_the_sessions_opened_with_the_old_one(
    pages: Pages, browser: Browser, tmp_path: Path
) -> None:
    """`relay it-admin passwd` for a leaked password left every session opened with it
    alive for up to session_max: the re-check only asked whether the name was there."""
    await browser.login()
    pages.it.sessions.recheck = 0.0
    assert (await browser.get("/devices"))[0] == 200  # re-checked: the same password
    new = "a brand new password"
    passwords.set_password(tmp_path / "admins", "carol", new, log2_n=10)
    assert (await browser.get("/devices"))[0] == 303
    assert len(pages.it.sessions) == 0
    assert "password changed" in descriptions(pages, "it_logout")[0]
    assert (await browser.login(password=new)).status == 303
    assert (await browser.get("/devices"))[0] == 200  # the new one's session is kept


async def test_an_audit_filter_time_with_an_offset_is_shown_and_paged_in_utc(
    pages: Pages, browser: Browser
) -> None:
    """The form and the Newer/Older links show the times without an offset (read back
    as UTC): 10:00+02:00 came back as 10:00, i.e. 10:00 UTC, on the next page."""
    await browser.login()
    status, body = await browser.get("/audit?since=2026-01-01T10:00%2B02:00&page=2")
    assert status == 200
    assert 'name="since" value="2026-01-01T08:00"' in body
    assert "since=2026-01-01T08%3A00" in body  # the Newer link
    for value in ("0001-01-01T00:00%2B01:00", "9999-12-31T23:59-01:00", "junk", "2026-13-01"):
        status, body = await browser.get(f"/audit?since={value}&until={value}")
        assert status == 200 and 'name="since" value=""' in body, value


def _corrupt(database: Path) -> None:
    """Garbage over the registry's files (the database, its WAL and shared memory)."""
    for part in database.parent.glob(database.name + "*"):
        size = part.stat().st_size
        with part.open("r+b") as f:
            f.write(b"\xa5" * size)


async def test_a_registry_that_fails_is_a_503_page_logged_in_one_line(
    pages: Pages, browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry file that is corrupt (or unreadable, or on a full disk) was aiohttp's
    bare 500: a traceback in the log, a page without this site's headers. Now each page
    that needs the registry says in one line what failed, with the headers, and the
    log has one line for it, without a traceback."""
    now = dt.datetime.now(dt.UTC)
    pages.authority.registry.record_certificate("ws1", 7, now, now + dt.timedelta(days=1), now)
    await browser.login()
    csrf = await browser.csrf()
    _corrupt(pages.authority.registry.path)
    caplog.set_level(logging.INFO)
    answers = [
        await browser.get("/devices"),
        await browser.get("/devices/revoke?device=ws1"),
    ]
    for path, data in [
        ("/codes", {"device": "ws2", "ttl": "1h"}),
        ("/devices/revoke", {"device": "ws1"}),
    ]:
        r = await browser.post(path, {**data, "csrf": csrf})
        answers.append((r.status, await r.text()))
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    for status, body in answers:
        assert status == 503, body
        assert "the device registry cannot be used now" in body
        assert "file is not a database" in body and "Traceback" not in body
        assert 'name="csrf"' in body  # still logged in: the page keeps its logout button
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == len(answers), [r.getMessage() for r in failed]
    assert all(r.name == "relay.agent.itpages.app" and r.exc_info is None for r in failed)
    assert all("the device registry failed" in r.getMessage() for r in failed)
    assert pages.audit("token_created") == []
