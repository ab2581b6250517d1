"""The IT pages served for real on 127.0.0.1 (aiohttp, plain HTTP and HTTPS), driven by
an HTTP client as a browser would: login, CSRF and origin checks, sessions and cookies,
enrollment codes (the code decodes, the registry and the audit trail have it), revocation
through the agent's revocation path (bodies pushed), the audit trail page, metrics."""

from __future__ import annotations

import datetime as dt
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.agent.audit import read_events
from relay.agent.authority import DeviceAuthority
from relay.agent.itpages import passwords
from relay.agent.itpages.app import ItPages, ItPagesMetrics, make_app
from relay.agent.itpages.auth import LocalAuthenticator, LoginLimiter
from relay.agent.itpages.sessions import SessionStore
from relay.ops.config import Address
from relay.trust.codes import parse_code
from relay.trust.revocation import decode_revocations
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


async def _serve(tmp_path: Path, tls: bool) -> AsyncIterator[Pages]:
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
        authenticator=LocalAuthenticator(admins),
        sessions=sessions,
        limiter=LoginLimiter(max_per_user=3),
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
