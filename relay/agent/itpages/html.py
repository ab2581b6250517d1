"""HTML that escapes by default: every value put into a page goes through `esc`, unless
it is `Html` (markup this package built itself).

Why not Jinja2: the pages are a handful of small tables and forms; `render` gives the
same guarantee as autoescaping (a value is escaped unless it was deliberately marked
safe, and only code here marks it) in a few lines, without a template language or a
new dependency. Templates are constants in the code, values are never templates.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

__all__ = ["Html", "esc", "join", "render"]


class Html(str):
    """Markup known to be safe: built here from constants and escaped values."""

    __slots__ = ()


def esc(value: object) -> Html:
    """`value` as HTML text (quotes included, for attributes); Html passes unchanged."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def render(template: str, /, **values: object) -> Html:
    """`template` (a constant) with each {name} replaced by esc(value)."""
    return Html(template.format(**{k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Html]) -> Html:
    return Html("".join(esc(p) for p in parts))


STYLE = Html(
    "body{font-family:sans-serif;margin:0;color:#222}"
    "header{background:#1f3b57;color:#fff;padding:.6em 1em;display:flex;gap:1.5em;"
    "align-items:center}header a{color:#fff}header form{margin-left:auto}"
    "main{padding:1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.9em}"
    ".error{color:#a00;font-weight:bold}.note{color:#555}"
    "code.enroll{font-size:1.1em;word-break:break-all;display:block;max-width:48em;"
    "padding:.5em;background:#eee}label{display:block;margin:.4em 0}"
)


def page(title: str, body: Html, *, user: str | None = None, csrf: str | None = None) -> Html:
    """A whole page: nav and logout form when logged in."""
    nav = Html("")
    if user is not None and csrf is not None:
        nav = render(
            '<a href="/devices">Devices</a><a href="/codes/new">New enrollment code</a>'
            '<a href="/audit">Audit trail</a>'
            '<form method="post" action="/logout"><span>{user}</span> '
            '<input type="hidden" name="csrf" value="{csrf}">'
            '<button type="submit">Log out</button></form>',
            user=user,
            csrf=csrf,
        )
    return render(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>{title} - relay agent</title><style>{style}</style></head>"
        "<body><header><strong>relay agent</strong>{nav}</header>"
        "<main><h1>{title}</h1>{body}</main></body></html>",
        title=title,
        style=STYLE,
        nav=nav,
        body=body,
    )
