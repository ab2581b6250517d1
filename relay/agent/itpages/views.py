"""The IT pages' HTML, one function per page; pure (data in, Html out), so they can be
tested for escaping without a server. Only the audit page may show patient data (audit
events of transfers name the patient); the others show devices, users and codes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from relay.agent.itpages.auditview import KINDS, AuditFilter, AuditPage
from relay.agent.itpages.html import Html, join, page, render
from relay.agent.registry import DeviceRow

__all__ = [
    "audit_page",
    "code_form",
    "code_shown",
    "devices_page",
    "login_page",
    "message_page",
    "revoke_confirm",
]


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


def status_of(row: DeviceRow, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.not_after is None:
        return "no certificate" if row.enrolled_at is None else "enrolled"
    return "expired" if row.not_after <= now else "active"


def _csrf(token: str) -> Html:
    return render('<input type="hidden" name="csrf" value="{token}">', token=token)


def login_page(csrf: str, *, error: str = "", user: str = "", directory: bool = False) -> Html:
    how = "your directory account (IT admin group)" if directory else "your IT admin password"
    body = render(
        '<p class="note">Log in with {how}.</p>{error}'
        '<form method="post" action="/login">{csrf}'
        '<label>User <input name="user" id="user" value="{user}" autocomplete="username" '
        'required maxlength="64"></label>'
        '<label>Password <input type="password" name="password" id="password" '
        'autocomplete="current-password" required maxlength="1024"></label>'
        '<button type="submit" id="login">Log in</button></form>',
        how=how,
        error=render('<p class="error" id="error">{e}</p>', e=error) if error else Html(""),
        csrf=_csrf(csrf),
        user=user,
    )
    return page("Log in", body)


def message_page(
    title: str, message: str, *, user: str | None = None, csrf: str | None = None
) -> Html:
    return page(
        title, render('<p class="error" id="error">{m}</p>', m=message), user=user, csrf=csrf
    )


def devices_page(
    rows: Sequence[DeviceRow], now: datetime, *, user: str, csrf: str, notice: str = ""
) -> Html:
    lines = []
    for r in rows:
        status = status_of(r, now)
        action = (
            Html("")
            if r.revoked
            else render(
                '<a href="/devices/revoke?device={d}" id="revoke-{d}">Revoke…</a>', d=r.name
            )
        )
        lines.append(
            render(
                '<tr id="device-{name}"><td>{name}</td><td class="user">{holder}</td>'
                '<td class="status">{status}</td><td>{seen}</td><td>{expiry}</td>'
                "<td>{action}</td></tr>",
                name=r.name,
                holder=r.user or "-",
                status=status,
                seen=_when(r.last_seen),
                expiry=_when(r.not_after),
                action=action,
            )
        )
    table = (
        render(
            '<table id="devices"><tr><th>Device</th><th>User</th><th>Status</th>'
            "<th>Last seen</th><th>Certificate expires</th><th></th></tr>{rows}</table>",
            rows=join(lines),
        )
        if lines
        else Html('<p id="empty">No devices yet: create an enrollment code.</p>')
    )
    note = render('<p class="note" id="notice">{n}</p>', n=notice) if notice else Html("")
    return page("Devices", join([note, table]), user=user, csrf=csrf)


def revoke_confirm(row: DeviceRow, *, user: str, csrf: str) -> Html:
    body = render(
        "<p>Revoke device <strong>{name}</strong> (user {holder})? Its certificate stops "
        "working at every gateway at once and its live connections are cut. This cannot "
        "be undone: the PC must be enrolled again under a new device name.</p>"
        '<form method="post" action="/devices/revoke">{csrf}'
        '<input type="hidden" name="device" value="{name}">'
        '<button type="submit" id="confirm">Revoke {name}</button> '
        '<a href="/devices">Cancel</a></form>',
        name=row.name,
        holder=row.user or "-",
        csrf=_csrf(csrf),
    )
    return page("Revoke a device", body, user=user, csrf=csrf)


TTL_CHOICES = (("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"))


def code_form(
    *, user: str, csrf: str, directory: bool, error: str = "", device: str = "", holder: str = ""
) -> Html:
    options = join(
        render(
            '<option value="{v}"{sel}>{label}</option>',
            v=v,
            label=label,
            sel=Html(" selected") if v == "24h" else Html(""),
        )
        for v, label in TTL_CHOICES
    )
    holder_field = (
        render(
            '<label>Directory user who will hold it <input name="user" id="holder" '
            'value="{h}" required maxlength="64"></label>',
            h=holder,
        )
        if directory
        else Html("")
    )
    body = render(
        "{error}"
        '<form method="post" action="/codes">{csrf}'
        '<label>Device name <input name="device" id="device" value="{device}" required '
        'maxlength="63"></label>{holder}'
        '<label>Valid for <select name="ttl" id="ttl">{options}</select></label>'
        '<button type="submit" id="create">Create code</button></form>',
        error=render('<p class="error" id="error">{e}</p>', e=error) if error else Html(""),
        csrf=_csrf(csrf),
        device=device,
        holder=holder_field,
        options=options,
    )
    return page("New enrollment code", body, user=user, csrf=csrf)


def code_shown(
    code: str,
    qr_svg: Html,
    *,
    device: str,
    holder: str | None,
    expires: datetime,
    user: str,
    csrf: str,
) -> Html:
    body = render(
        "<p>Enrollment code for device <strong>{device}</strong>{holder}, valid until "
        "{expires}, single use. It is shown only this once: give it to the PC's user now "
        "(<code>relay enroll CODE</code>, or scan the QR code).</p>"
        '<code class="enroll" id="code">{code}</code><div id="qr">{qr}</div>',
        device=device,
        holder=render(" for user <strong>{h}</strong>", h=holder) if holder else Html(""),
        expires=_when(expires),
        code=code,
        qr=qr_svg,
    )
    return page("Enrollment code", body, user=user, csrf=csrf)


def _participants(event: dict[str, Any]) -> str:
    names = []
    for p in event.get("ActiveParticipant") or []:
        if isinstance(p, dict):
            name = str(p.get("UserID", ""))
            if p.get("UserName"):
                name += f" ({p['UserName']})"
            names.append(name)
    return ", ".join(names)


def _objects(event: dict[str, Any]) -> str:
    return ", ".join(
        str(o.get("ParticipantObjectID", ""))
        for o in event.get("ParticipantObjectIdentification") or []
        if isinstance(o, dict)
    )


def _input_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M") if value is not None else ""


def audit_page(result: AuditPage, f: AuditFilter, *, user: str, csrf: str) -> Html:
    kinds = join(
        [Html('<option value="">any</option>')]
        + [
            render(
                '<option value="{k}"{sel}>{k}</option>',
                k=k,
                sel=Html(" selected") if k == f.kind else Html(""),
            )
            for k in KINDS
        ]
    )
    form = render(
        '<form method="get" action="/audit" id="filters">'
        'Device <input name="device" value="{device}" maxlength="200"> '
        'User <input name="user" value="{u}" maxlength="200"> '
        'Kind <select name="kind">{kinds}</select> '
        'From <input type="datetime-local" name="since" value="{since}"> '
        'to <input type="datetime-local" name="until" value="{until}"> (UTC) '
        '<button type="submit">Filter</button></form>',
        device=f.device,
        u=f.user,
        kinds=kinds,
        since=_input_time(f.since),
        until=_input_time(f.until),
    )
    rows = []
    for e in result.events:
        ident = e.get("EventIdentification") or {}
        rows.append(
            render(
                '<tr class="event"><td>{at}</td><td class="kind">{kind}</td><td>{outcome}</td>'
                '<td class="user">{u}</td><td>{who}</td><td>{objects}</td><td>{desc}</td></tr>',
                at=ident.get("EventDateTime", ""),
                kind=e.get("kind", ""),
                outcome=ident.get("EventOutcomeIndicator", ""),
                u=e.get("user", ""),
                who=_participants(e),
                objects=_objects(e),
                desc=ident.get("EventOutcomeDescription", ""),
            )
        )
    table = render(
        '<table id="events"><tr><th>Time (UTC)</th><th>Kind</th><th>Outcome</th><th>User</th>'
        "<th>Participants</th><th>Objects</th><th>Description</th></tr>{rows}</table>",
        rows=join(rows),
    )
    query = {
        "device": f.device,
        "user": f.user,
        "kind": f.kind,
        "since": _input_time(f.since),
        "until": _input_time(f.until),
    }
    links = []
    if result.page > 1:
        links.append(
            render(
                '<a href="/audit?{q}" id="newer">Newer</a>',
                q=urlencode({**query, "page": result.page - 1}),
            )
        )
    if result.has_more:
        links.append(
            render(
                '<a href="/audit?{q}" id="older">Older</a>',
                q=urlencode({**query, "page": result.page + 1}),
            )
        )
    note = (
        render(
            '<p class="note">Stopped after reading {n} events: narrow the filters.</p>',
            n=result.scanned,
        )
        if result.truncated
        else Html("")
    )
    body = join(
        [form, note, table, render("<p>Page {p} {links}</p>", p=result.page, links=join(links))]
    )
    return page("Audit trail", body, user=user, csrf=csrf)
