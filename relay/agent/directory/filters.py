"""User names and LDAP search filters, built so that no user name can change a filter.

A user name comes from a PC (enrollment) or a login form: it is checked against a narrow
rule first (relay.trust.users: letters, digits, `.`, `_`, `-`, `@`; 64 at most), and escaped as
RFC 4515 asks (`*`, `(`, `)`, `\\`, NUL) anyway, so a rule widened later stays safe.
"""

from __future__ import annotations

from typing import Final

from relay.trust.users import MAX_USERNAME, USERNAME_RULE, check_username

__all__ = [
    "MAX_USERNAME",
    "USERNAME_RULE",
    "check_filter",
    "check_username",
    "escape_filter_value",
    "match_filter",
    "user_filter",
]

#: The placeholder in `directory.user_filter`.
PLACEHOLDER: Final = "{user}"


def escape_filter_value(value: str) -> str:
    """RFC 4515 escaping of an assertion value (also for DNs put into filters)."""
    out: list[str] = []
    for ch in value:
        if ch in "*()\\\x00":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def check_filter(template: str, *, placeholder: bool) -> str:
    """A filter from the config: parenthesised, balanced, with `{user}` exactly once when
    `placeholder` (and no other braces). ValueError otherwise."""
    if not (template.startswith("(") and template.endswith(")")):
        raise ValueError(f"expected an LDAP filter in parentheses, got {template!r}")
    depth = 0
    for ch in template:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {template!r}")
    rest = template.replace(PLACEHOLDER, "", 1) if placeholder else template
    if placeholder and PLACEHOLDER not in template:
        raise ValueError(f"the filter must contain {PLACEHOLDER} (e.g. (uid={PLACEHOLDER}))")
    if "{" in rest or "}" in rest:
        raise ValueError(f"unexpected braces in {template!r} (only one {PLACEHOLDER})")
    return template


def user_filter(template: str, user: str) -> str:
    """`template` with `{user}` replaced by the checked, escaped user name."""
    return template.replace(PLACEHOLDER, escape_filter_value(check_username(user)), 1)


def match_filter(attribute: str, value: str) -> str:
    """`(attribute=value)` with the value escaped (a DN, for group membership)."""
    return f"({attribute}={escape_filter_value(value)})"
