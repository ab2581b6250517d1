"""What keeps a local web server local: the Host check, the Origin check, bounded requests.

A page on any web site can make the browser send requests to 127.0.0.1; DNS rebinding
lets it read the answers by naming 127.0.0.1 with its own host name. So every request
must name the loopback host and our port in its Host header (403 otherwise), and a
request from another origin (an `Origin` header that is not ours) is refused (403):
there is no CORS at all, wildcard or not. A page cannot read our answers then, but its
`<img>` and links still send GETs without an `Origin`, each of which could start a
series retrieval at the PACS: browsers mark those `Sec-Fetch-Site: cross-site`, or
`same-site` when the page is another web app on a loopback name of ours on another port
(a site ignores the port), and DICOMweb refuses both (403; the viewer's own requests are
`same-origin`; viewers that are not browsers send no such header). The
viewer's page stays open to them: a RIS or worklist on another site links to it (and
the viewer starts no warm-up for such a navigation, viewer/warmup.py). Query strings
are bounded (414).

Every answer of the listener (DICOMweb, the viewer, the refusals, aiohttp's own error
pages) says `X-Content-Type-Options: nosniff`, so none is read as another type than it
says; an HTML one also gets HTML_CSP (no framing by another page: clickjacking) and
`X-Frame-Options: DENY` for older browsers (security_headers, app.py applies it).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Final

__all__ = [
    "FETCH_SITES_ALLOWED",
    "HTML_CSP",
    "LOOPBACK_NAMES",
    "allowed_hosts",
    "allowed_origins",
    "fetch_allowed",
    "host_allowed",
    "security_headers",
]

LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "[::1]")
# What OHIF's page needs to be allowed is left to the defaults (its scripts, workers and
# wasm are its own origin's); only what no page of ours uses is closed.
HTML_CSP: Final = "frame-ancestors 'none'; object-src 'none'; base-uri 'self'; form-action 'self'"
# Sec-Fetch-Site values a DICOMweb request may carry: our page (the viewer is served from
# the same origin), the address bar or a bookmark, or no browser at all ("").
FETCH_SITES_ALLOWED: Final = frozenset({"", "same-origin", "none"})


def allowed_hosts(ports: Iterable[int]) -> frozenset[str]:
    """Every Host header value we answer: the loopback names with our port, or without a
    port (dicomweb-client leaves it out). What stops DNS rebinding is the name: a
    rebound page's requests carry its own host name, whatever the port."""
    hosts = set(LOOPBACK_NAMES)
    for port in ports:
        for name in LOOPBACK_NAMES:
            hosts.add(f"{name}:{port}")
    return frozenset(hosts)


def allowed_origins(hosts: Iterable[str]) -> frozenset[str]:
    return frozenset(f"http://{h}" for h in hosts)


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names us (case-insensitive, one trailing dot tolerated)."""
    if not host:
        return False
    host = host.strip().lower()
    if host in allowed:
        return True
    name, sep, port = host.rpartition(":")
    return bool(sep) and name.endswith(".") and f"{name[:-1]}:{port}" in allowed


def fetch_allowed(sec_fetch_site: str | None) -> bool:
    """Whether the browser says the request comes from our own pages (`same-origin`), a
    typed address or a bookmark (`none`), or it is not a browser (no header). Not
    `same-site`: a site is the host without its port, so any other web app on localhost
    or 127.0.0.1 (another port) is same-site, and its `<img>` would start retrievals."""
    return (sec_fetch_site or "").strip().lower() in FETCH_SITES_ALLOWED


def security_headers(headers: MutableMapping[str, str]) -> None:
    """Add nosniff to an answer's headers, and the CSP and frame refusal to an HTML one
    (headers the handler set itself are kept)."""
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if headers.get("Content-Type", "").lower().startswith("text/html"):
        headers.setdefault("Content-Security-Policy", HTML_CSP)
        headers.setdefault("X-Frame-Options", "DENY")
