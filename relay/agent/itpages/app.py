"""The IT pages as an aiohttp application: login, sessions, CSRF, and the pages.

Every request passes `_guard` (security headers, no caching); every POST is checked for
its origin (Origin, else Referer, must be this site) and its CSRF token (the session's,
or for the login form the pre-login cookie's), and refused with 403 otherwise (the
reason logged at debug). Pages other than /login need a live session: a GET without one
goes to /login, a POST without one is refused with 403. Paths that are no page (a
browser's /favicon.ico) are 404 without a redirect.

The pre-login token is signed with a per-process key and kept while it is valid: a
browser that loads /login again (another tab, or a request the page triggers, which
used to be redirected to /login) keeps the token of the form it already shows.

A login attempt counts against the failed-login limit from before its password is
checked (parallel guesses cannot all slip through), and gives up after `login_timeout`.
A directory that did not answer in time, or answered busy or unavailable, is a 503 and
the attempt is given back (an outage must not lock IT out). Of the logins refused while
blocked, the first of each block is audited and the rest counted in one later event. A
session whose user is no longer an IT admin (checked again every
sessions.RECHECK_INTERVAL) ends at its next request. A device registry that fails
(RegistryUnavailable) is a 503 page naming what failed, logged in one line.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import segno
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from relay.agent.audit import Outcome
from relay.agent.authority import DeviceAuthority
from relay.agent.itpages import views
from relay.agent.itpages.auditview import (
    KINDS,
    MAX_FILTER_CHARS,
    AuditFilter,
    AuditPage,
    device_named,
    query_audit,
)
from relay.agent.itpages.auth import (
    Authenticator,
    LoginLimiter,
    LoginResult,
    RefusalSampler,
    Suppressed,
)
from relay.agent.itpages.html import Html
from relay.agent.itpages.sessions import Session, SessionStore
from relay.agent.registry import RegistryError, RegistryUnavailable, RevokeResult
from relay.ops.config import Address
from relay.trust import pki
from relay.trust.codes import CodeError, EnrollmentCode
from relay.trust.identity import Identity, check_name
from relay.trust.users import check_username

__all__ = ["ItPages", "ItPagesMetrics", "allowed_hosts", "host_allowed", "make_app"]

log = logging.getLogger(__name__)

MAX_BODY: Final = 16 * 1024  # every form here is small
TTLS: Final = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SESSION_KEY: Final = web.RequestKey("session", Session)
#: Seconds a login (or a session's re-check) waits for the directory or the password file.
LOGIN_TIMEOUT: Final = 15.0


class ItPagesMetrics:
    """relay_it_logins_total{result}, relay_it_actions_total{action}, relay_it_sessions."""

    def __init__(self, registry: CollectorRegistry | None, sessions: SessionStore) -> None:
        self.logins = Counter(
            "relay_it_logins", "IT page logins by result", ["result"], registry=registry
        )
        self.actions = Counter(
            "relay_it_actions", "IT page actions by kind", ["action"], registry=registry
        )
        self.sessions = Gauge("relay_it_sessions", "live IT page sessions", registry=registry)
        self.sessions.set_function(lambda: len(sessions))


def _utcnow() -> datetime:
    return datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class ItPages:
    """What the pages work with (one per agent)."""

    authority: DeviceAuthority
    push: Callable[[list[bytes]], None]  # revocation bodies to every gateway link
    authenticator: Authenticator
    sessions: SessionStore
    limiter: LoginLimiter
    gateway: Address  # what new codes tell PCs to dial
    tls: bool
    directory: bool  # codes need a user
    metrics: ItPagesMetrics
    now: Callable[[], datetime] = _utcnow
    login_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    login_timeout: float = LOGIN_TIMEOUT
    #: Host header values answered (`allowed_hosts`); None: any (before the server
    #: knows its port). Anything else is refused: DNS rebinding.
    hosts: frozenset[str] | None = None
    #: Which rate-limited refusals are audited (the limiter's window and clock).
    refusals: RefusalSampler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.refusals = RefusalSampler(window=self.limiter.window, clock=self.limiter.clock)

    def audit_suppressed(self, blocks: list[Suppressed]) -> None:
        """One it_login event per block: how many refusals were not audited one by one."""
        for block in blocks:
            self.authority.audit.it_login(
                now=self.now(),
                admin=block.user,
                peer=block.peer,
                outcome=Outcome.MINOR_FAILURE,
                description=block.describe(self.refusals.window),
                refusals=block.count,
            )

    def flush_refusals(self, *, everything: bool = False) -> None:
        """Audit the counts of blocks whose window has ended (`everything`: all, at stop)."""
        self.audit_suppressed(self.refusals.drain() if everything else self.refusals.due())

    def login_token(self) -> str:
        """A new pre-login CSRF token: a random nonce and its MAC under `login_key`."""
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._mac(nonce)}"

    def issued(self, token: str | None) -> bool:
        """`token` is a pre-login token this process made (not one a client chose).
        Compared as bytes: hmac.compare_digest raises TypeError for a str that is not
        ASCII, and a cookie is whatever the client sent (a 500 on /login, before)."""
        if token is None or len(token) > 128 or not token.isascii():
            return False
        nonce, dot, mac = token.partition(".")
        return bool(nonce and dot) and hmac.compare_digest(mac.encode(), self._mac(nonce).encode())

    def _mac(self, nonce: str) -> str:
        digest = hmac.new(self.login_key, nonce.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @property
    def cookie(self) -> str:
        # __Host-: the browser keeps it only if Secure, Path=/ and no Domain (HTTPS only).
        return "__Host-relay-it" if self.tls else "relay-it"

    @property
    def login_cookie(self) -> str:
        return "__Host-relay-login" if self.tls else "relay-login"


APP_KEY: Final = web.AppKey("itpages", ItPages)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _html(body: Html, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _peer(request: web.Request) -> str:
    return request.remote or "unknown"


def allowed_hosts(listen: Address, port: int, *, cert: Path | None = None) -> frozenset[str]:
    """The Host header values of this site: the listen address (unless a wildcard), the
    loopback names on a loopback address, and the names and addresses of the TLS
    certificate (what a browser accepts for it; `*.x` names as they are), each with
    the port, and without it on the scheme's default port."""
    names: set[str] = set()
    if listen.host not in ("0.0.0.0", "::", ""):
        names.add(listen.host.lower().rstrip("."))
    if listen.is_loopback:
        names.update(("127.0.0.1", "localhost", "::1"))
    if cert is not None:
        names.update(_certificate_names(cert))
    default = 443 if cert is not None else 80
    hosts: set[str] = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        hosts.add(f"{shown}:{port}")
        if port == default:
            hosts.add(shown)
    return frozenset(hosts)


def _certificate_names(path: Path) -> set[str]:
    first = x509.load_pem_x509_certificates(path.read_bytes())[0]
    try:
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
    return names | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this site (case-insensitive, a trailing dot
    tolerated, `*.x` certificate names matching one label)."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port
        name, _, rest = host.partition("]")
        name, port = name + "]", rest.removeprefix(":")
    else:
        name, _, port = host.partition(":")
    name = name.rstrip(".")
    suffix = f":{port}" if port else ""
    if f"{name}{suffix}" in allowed:
        return True
    label, dot, parent = name.partition(".")
    return bool(label and dot and not name.startswith("[")) and f"*.{parent}{suffix}" in allowed


def _same_origin(request: web.Request, tls: bool) -> bool:
    """The POST comes from a page of this site: Origin, else Referer, names it."""
    expected = f"{'https' if tls else 'http'}://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == expected
    referer = request.headers.get("Referer")
    if referer is None:
        return False
    parts = urlsplit(referer)
    return f"{parts.scheme}://{parts.netloc}" == expected


def _token_ok(presented: object, expected: str | None) -> bool:
    """Constant-time; any text the client sent (lone surrogates from an undecodable
    cookie included) is compared, never an exception."""
    return (
        isinstance(presented, str)
        and expected is not None
        and hmac.compare_digest(_utf8(presented), _utf8(expected))
    )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _set_cookie(response: web.StreamResponse, it: ItPages, name: str, value: str) -> None:
    response.set_cookie(name, value, path="/", secure=it.tls, httponly=True, samesite="Strict")


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    it = request.app[APP_KEY]
    it.flush_refusals()  # cheap: looks at the oldest block only, unless some ended
    try:
        response = await _checked(request, it, handler)
    except RegistryUnavailable as exc:
        response = _registry_failed(request, exc)
    return _headers(response)


def _registry_failed(request: web.Request, exc: RegistryUnavailable) -> web.Response:
    """503 naming what failed in one line (a registry file unreadable, corrupt, on a full
    disk): it was aiohttp's bare 500 with a traceback in the log and none of this site's
    headers. Logged once, as one line: the registry's message names its file and
    SQLite's reason, never a device's data or a patient's."""
    what = " ".join(str(exc).split())[:300]
    log.error("IT page %s %s: the device registry failed: %s", request.method, request.path, what)
    session = request.get(SESSION_KEY)
    page = views.message_page(
        "Unavailable",
        f"the device registry cannot be used now ({what}); try again later",
        user=session.user if session is not None else None,
        csrf=session.csrf if session is not None else None,
    )
    return _html(page, 503)


async def _checked(request: web.Request, it: ItPages, handler: Handler) -> web.StreamResponse:
    """The request through the guard's checks (Host, origin, session, CSRF), then its
    handler; without the security headers, which _guard adds to every answer."""
    if it.hosts is not None and not host_allowed(request.headers.get("Host"), it.hosts):
        # A page of another site whose name was made to point at us (DNS rebinding)
        # would otherwise be same-origin with its own name in Host, Origin and Referer.
        response: web.StreamResponse = _forbidden(
            request, "this address does not name the IT pages (Host header)"
        )
    elif request.method == "POST" and not _same_origin(request, it.tls):
        response = _forbidden(request, "the request did not come from this site")
    elif request.match_info.http_exception is not None:
        # no such page (e.g. /favicon.ico): 404/405 as is; a redirect to /login here
        # would only hand the browser a new login page it never shows
        response = await handler(request)
    elif request.method == "POST" and (unread := await _unreadable_form(request)) is not None:
        response = unread
    elif request.path == "/login":
        response = await handler(request)
    else:
        session = it.sessions.get(request.cookies.get(it.cookie))
        if session is None:
            if request.method == "POST":
                response = _forbidden(request, "not logged in (or the session expired)")
            else:
                response = _see_other("/login")
        elif it.sessions.due(session) and not await _still_admin(request, it, session):
            it.sessions.drop(session.id)
            why = "you are no longer an IT admin, or your password changed: the session ended"
            if request.method == "POST":
                response = _forbidden(request, why)
            else:
                response = _see_other("/login")
            response.del_cookie(it.cookie, path="/")
        else:
            if request.method == "POST":
                form = await request.post()
                if not _token_ok(form.get("csrf"), session.csrf):
                    why = "missing" if form.get("csrf") is None else "wrong"
                    return _forbidden(request, f"{why} CSRF token: reload the page")
            request[SESSION_KEY] = session
            response = await handler(request)
    return response


async def _unreadable_form(request: web.Request) -> web.Response | None:
    """Reads a POST's form once, here (handlers then get aiohttp's cached copy): a
    refusal page for a body that is too big (413) or is no form we can read (400:
    bytes that are not UTF-8, an unknown charset, a multipart body without boundary or
    field name...), with this site's headers; None when it reads. Those bodies were a
    500, and a 413 without the security headers."""
    try:
        await request.post()
    except web.HTTPException as exc:  # too large, too many fields
        why = f"the request is too large (at most {MAX_BODY} bytes of form fields)"
        return _refused(request, exc.status, why, exc.text or "")
    except (ValueError, LookupError, RuntimeError, HttpProcessingError) as exc:
        return _refused(request, 400, "the form could not be read", _one_line(exc))
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


async def _still_admin(request: web.Request, it: ItPages, session: Session) -> bool:
    """Whether the session's user is still an IT admin; ends nothing it cannot tell."""
    try:
        async with asyncio.timeout(it.login_timeout):
            verdict = await it.authenticator.still_admin(session.user, session.stamp)
    except TimeoutError:
        verdict = None
    if verdict is None:
        # The directory (or the admins file) cannot say now: keep the session and ask
        # again after the interval. Ending sessions on an outage would lock IT out of the
        # pages just when they may need them (revoking a device by hand, say).
        log.warning(
            "IT page session kept: cannot check now whether its user is still an IT admin",
            extra={"user": session.user},
        )
        return True
    if not verdict:
        it.authority.audit.it_logout(
            now=it.now(),
            admin=session.user,
            peer=_peer(request),
            description=(
                "session ended: no longer an IT admin, or the password changed (checked "
                "again after login)"
            ),
        )
        log.warning(
            "IT page session ended: no longer an IT admin, or the password changed",
            extra={"user": session.user},
        )
    return verdict


def _origin_of(request: web.Request) -> str:
    return f"Origin {request.headers.get('Origin')!r}, Referer {request.headers.get('Referer')!r}"


def _forbidden(request: web.Request, why: str, detail: str = "") -> web.Response:
    """403 with `why` on the page; at debug also what the request brought (no values
    of tokens or cookies: only whether they were there)."""
    return _refused(request, 403, why, detail)


def _refused(request: web.Request, status: int, why: str, detail: str = "") -> web.Response:
    """`status` with `why` on the page, logged at debug as _forbidden says."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "IT page %s %s refused: %s (%s; host %r; cookies %s)",
            request.method,
            request.path,
            why,
            detail or _origin_of(request),
            request.host,
            sorted(request.cookies),
        )
    return _html(views.message_page("Refused", why), status)


def _headers(response: web.StreamResponse) -> web.StreamResponse:
    h = response.headers
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "same-origin"
    h["Cache-Control"] = "no-store"
    return response


# -- login and logout


def _login_token(request: web.Request, it: ItPages) -> str:
    """The browser's pre-login token if this process issued it, else a new one."""
    current = request.cookies.get(it.login_cookie)
    return current if current is not None and it.issued(current) else it.login_token()


async def _login_form(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    token = _login_token(request, it)
    response = _html(views.login_page(token, directory=it.directory))
    _set_cookie(response, it, it.login_cookie, token)
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    form = await request.post()
    cookie = request.cookies.get(it.login_cookie)
    if not (it.issued(cookie) and _token_ok(form.get("csrf"), cookie)):
        if cookie is None:
            why = "no login cookie"
        elif not it.issued(cookie):
            why = "a login cookie this process did not issue"
        else:
            why = "the login cookie and the form's token differ"
        return _forbidden(request, "missing or wrong CSRF token: reload the login page", why)
    user = str(form.get("user", ""))[:64].strip()
    password = str(form.get("password", ""))
    peer = _peer(request)
    audit = it.authority.audit
    token = _login_token(request, it)

    def again(error: str, status: int) -> web.Response:
        response = _html(
            views.login_page(token, error=error, user=user, directory=it.directory), status
        )
        _set_cookie(response, it, it.login_cookie, token)
        return response

    if not user or not password:
        return again("user and password are required", 400)
    # Counted as failed now, before the check, so that concurrent attempts see it.
    attempt = it.limiter.reserve(peer, user)
    if attempt is None:
        it.metrics.logins.labels("rate_limited").inc()
        key = it.limiter.blocking(peer, user) or ("user", user.lower())
        first, ended = it.refusals.refused(key, user=user, peer=peer, at=it.now())
        it.audit_suppressed(ended)
        if first:  # the others of this block are counted, audited in one event later
            audit.it_login(
                now=it.now(),
                admin=user,
                peer=peer,
                outcome=Outcome.MINOR_FAILURE,
                description="rate_limited: too many failed logins",
            )
        return again("too many failed logins: wait a few minutes", 429)
    late = False
    try:
        async with asyncio.timeout(it.login_timeout):
            result = await it.authenticator.authenticate(user, password)
    except TimeoutError:
        late = True
        result = LoginResult("unavailable", user, f"no answer within {it.login_timeout:g} s")
    it.metrics.logins.labels(result.result).inc()
    if result.result == "unavailable":
        it.limiter.release(attempt)  # not a failed login: an outage must not lock IT out
        audit.it_login(
            now=it.now(),
            admin=user,
            peer=peer,
            outcome=Outcome.SERIOUS_FAILURE,
            description=f"unavailable: {result.detail}",
        )
        if late:
            what = it.authenticator.what
            return again(f"{what} did not answer in time; try again later", 503)
        return again(f"{it.authenticator.what} is unavailable; try again later", 503)
    if not result.ok:  # counted by reserve() already
        audit.it_login(
            now=it.now(),
            admin=user,
            peer=peer,
            outcome=Outcome.MINOR_FAILURE,
            description=f"{result.result}: {result.detail}",
        )
        log.warning(
            "IT page login refused", extra={"user": user, "peer": peer, "result": result.result}
        )
        return again("login refused: wrong user or password, or not an IT admin", 401)
    it.limiter.release(attempt)
    it.limiter.succeeded(user)
    # A new id at each login (no fixation), and the one this browser held before ends
    # here: a copy of it (taken earlier) must not outlive the login that replaced it.
    previous = request.cookies.get(it.cookie)
    if previous:
        it.sessions.drop(previous)
    session = it.sessions.create(result.user, stamp=result.stamp)
    audit.it_login(
        now=it.now(),
        admin=result.user,
        peer=peer,
        outcome=Outcome.SUCCESS,
        description=f"ok: {result.detail}",
    )
    response = _see_other("/devices")
    _set_cookie(response, it, it.cookie, session.id)
    response.del_cookie(it.login_cookie, path="/")
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    session = request[SESSION_KEY]
    it.sessions.drop(session.id)
    it.metrics.actions.labels("logout").inc()
    it.authority.audit.it_logout(
        now=it.now(), admin=session.user, peer=_peer(request), description="logged out"
    )
    response = _see_other("/login")
    response.del_cookie(it.cookie, path="/")
    return response


# -- devices


async def _root(request: web.Request) -> web.StreamResponse:
    return _see_other("/devices")


async def _devices(request: web.Request, notice: str = "") -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    rows = await asyncio.to_thread(it.authority.registry.list_devices)
    return _html(views.devices_page(rows, it.now(), user=s.user, csrf=s.csrf, notice=notice))


async def _revoke_form(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    name = request.query.get("device", "")
    row = it.authority.registry.get_device(name) if name else None
    if row is None:
        return _html(
            views.message_page("Not found", f"no device {name!r}", user=s.user, csrf=s.csrf), 404
        )
    return _html(views.revoke_confirm(row, user=s.user, csrf=s.csrf))


async def _revoke(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    name = str((await request.post()).get("device", ""))
    if not name or it.authority.registry.get_device(name) is None:
        return _html(
            views.message_page("Not found", f"no device {name!r}", user=s.user, csrf=s.csrf), 404
        )
    try:
        result, bodies = it.authority.revoke_by(name, f"it:{s.user}")
    except RegistryUnavailable:
        raise  # the guard's 503
    except RegistryError as exc:
        return _html(views.message_page("Error", str(exc), user=s.user, csrf=s.csrf), 500)
    if bodies:
        it.push(bodies)  # live links cut now, not at the next registry poll
    if result is RevokeResult.ALREADY:
        return await _devices(request, f"device {name} was already revoked")
    it.metrics.actions.labels("revoke").inc()
    log.info("device revoked on the IT pages", extra={"device": name, "admin": s.user})
    return await _devices(request, f"revoked {name}; its links are cut at every gateway")


# -- enrollment codes


async def _code_form(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    return _html(views.code_form(user=s.user, csrf=s.csrf, directory=it.directory))


def qr_svg(text: str) -> Html:
    """The code as an inline SVG QR code (segno: pure Python, no image library)."""
    qr = segno.make(text, error="m")
    return Html(qr.svg_inline(scale=3, title="enrollment code"))


async def _code_create(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    form = await request.post()
    device = str(form.get("device", "")).strip()
    holder = str(form.get("user", "")).strip() if it.directory else ""
    ttl = TTLS.get(str(form.get("ttl", "")))

    def error(message: str) -> web.Response:
        page = views.code_form(
            user=s.user,
            csrf=s.csrf,
            directory=it.directory,
            error=message,
            device=device[:63],
            holder=holder[:64],
        )
        return _html(page, 400)

    try:
        check_name(device, "device name")
        if it.directory:
            check_username(holder)
    except ValueError as exc:
        return error(str(exc))
    if ttl is None:
        return error("choose how long the code stays valid")
    authority = it.authority
    at = it.now()
    try:
        token_id, secret = authority.registry.create_token(device, ttl, at, user=holder or None)
        code = EnrollmentCode(
            it.gateway,
            pki.ca_fingerprint(authority.ca_cert),
            authority.site,
            device,
            token_id,
            secret,
            holder or None,
        )
    except RegistryUnavailable:
        raise  # the guard's 503: not the form's fault
    except (RegistryError, CodeError) as exc:
        return error(str(exc))
    authority.audit.token_created(
        now=at,
        device=device,
        token_id=token_id,
        expires_at=at + ttl,
        actor=f"it:{s.user}",
        user=holder or None,
    )
    it.metrics.actions.labels("code_created").inc()
    text = code.encode()
    page = views.code_shown(
        text,
        qr_svg(text),
        device=device,
        holder=holder or None,
        expires=at + ttl,
        user=s.user,
        csrf=s.csrf,
    )
    return _html(page)


# -- audit trail


def _time(value: str) -> datetime | None:
    """A filter time in UTC (without an offset, it is UTC). Converted, not kept with its
    offset: the form and the page links show it without one, so a time with an offset
    became another time on the next page. None for what does not read as a time."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value[:32])
        return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
    except (ValueError, OverflowError):  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        return None


def _query_audit(authority: DeviceAuthority, f: AuditFilter) -> AuditPage:
    """The page of `f`; a device filter that is the name of a registered device names
    that device (its set only is read: see auditview). In a worker thread."""
    if f.device and not device_named(f.device):
        try:
            known = authority.registry.get_device(f.device) is not None
        except RegistryError:
            known = False  # the substring filter still works without the registry
        if known:
            uri = Identity.device(authority.trust_domain, authority.site, f.device).uri
            f = replace(f, device_id=uri)
    return query_audit(authority.audit.path, f)


async def _audit(request: web.Request) -> web.StreamResponse:
    it = request.app[APP_KEY]
    s = request[SESSION_KEY]
    q = request.query
    kind = q.get("kind", "")
    try:
        number = int(q.get("page", "1"))
    except ValueError:
        number = 1
    f = AuditFilter(
        device=q.get("device", "")[:MAX_FILTER_CHARS].strip(),
        user=q.get("user", "")[:MAX_FILTER_CHARS].strip(),
        kind=kind if kind in KINDS else "",
        since=_time(q.get("since", "")),
        until=_time(q.get("until", "")),
        page=number,
    )
    result = await asyncio.to_thread(_query_audit, it.authority, f)
    it.metrics.actions.labels("audit_view").inc()
    return _html(views.audit_page(result, f, user=s.user, csrf=s.csrf))


def make_app(it: ItPages) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_guard])
    app[APP_KEY] = it
    app.router.add_get("/", _root)
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/devices", _devices)
    app.router.add_get("/devices/revoke", _revoke_form)
    app.router.add_post("/devices/revoke", _revoke)
    app.router.add_get("/codes/new", _code_form)
    app.router.add_post("/codes", _code_create)
    app.router.add_get("/audit", _audit)
    return app
