"""`relay token create` and `relay device list|revoke`: IT's tools, run beside the agent.

They open the agent's registry and audit trail in `state_dir` directly (SQLite in WAL
mode and flock-ed appends make that safe while the agent runs). A revocation made here
reaches the gateways through the running agent, which notices the registry change
within a second (relay.agent.registry.RevocationWatcher) and pushes it.

Each function returns the process exit status: 0 done, 1 nothing to do (already
revoked), 2 a user error printed as one line on stderr (a name the registry does not know
is one for `device revoke`: a typo must not look like success; `--force` revokes it anyway,
for a device issued offline that never connected).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from relay.agent.audit import AUDIT_FILE, AuditLog
from relay.agent.config import AgentConfig, load_agent_config
from relay.agent.registry import (
    REGISTRY_FILE,
    DeviceRegistry,
    DeviceRow,
    RegistryError,
    RevokeResult,
)
from relay.ops.config import Address, ConfigError, parse_address, parse_duration
from relay.trust import pki
from relay.trust.codes import CodeError, EnrollmentCode
from relay.trust.identity import Identity, IdentityError
from relay.trust.users import check_username

__all__ = ["DEFAULT_TTL", "device_list", "device_revoke", "open_state", "token_create"]

DEFAULT_TTL = timedelta(hours=24)
PROG = "relay"


def _utcnow() -> datetime:
    return datetime.now(dt.UTC).replace(microsecond=0)


def _fail(command: str, message: object) -> int:
    print(f"{PROG} {command}: {message}", file=sys.stderr)
    return 2


def _actor() -> str:
    """Who ran the command, for the audit trail."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def _agent_identity(config: AgentConfig) -> str:
    """The agent's SPIFFE ID (its audit source id), from its own certificate."""
    try:
        return str(
            Identity.agent(pki.trust_domain_of_ca(pki.load_cert(config.tls.ca)), config.site)
        )
    except (pki.PkiError, IdentityError):
        return f"agent/{config.site}"


def _user_name(uid: int) -> str:
    import pwd  # POSIX only: the caller checked

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_owner(state: Path) -> None:
    """Refuse to write into another user's state_dir (POSIX): files created there (the
    audit trail and its lock, the registry and its WAL) would belong to this user, and
    the agent, running as the owner (User=relay-agent), could no longer write them."""
    if not hasattr(os, "geteuid"):  # Windows: no owner to keep
        return
    try:
        owner = state.stat().st_uid
    except OSError as exc:
        raise RegistryError(f"cannot read state_dir {state}: {exc.strerror}") from None
    if owner != os.geteuid():
        name = _user_name(owner)
        raise RegistryError(
            f"state_dir {state} belongs to {name}, not to {_user_name(os.geteuid())}: run "
            f"this as {name} (e.g. runuser -u {name} -- relay ...), so that the agent can "
            "still write what it creates"
        )


def open_state(config: AgentConfig) -> tuple[DeviceRegistry, AuditLog]:
    """The registry and audit log of an agent config, creating state_dir (0700) if needed;
    RegistryError if state_dir belongs to another user (POSIX)."""
    state = config.state_dir
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(f"cannot create state_dir {state}: {exc.strerror}") from None
    _check_owner(state)
    registry = DeviceRegistry(state / REGISTRY_FILE, site=config.site)

    def user_of(device_uri: str) -> str | None:
        name = device_uri.rsplit("/", 1)[-1]
        return registry.device_user(name) if name else None

    audit = AuditLog(
        state / AUDIT_FILE,
        source_id=_agent_identity(config),
        site=config.site,
        # the agent's bounds: the CLI writes to the same sets and rotates them too
        max_bytes=config.audit.max_bytes,
        keep=config.audit.keep,
        max_devices=config.audit.max_devices,
        user_of=user_of if config.directory is not None else None,
    )
    return registry, audit


def _parse_ttl(ttl: str | float | timedelta | None) -> timedelta:
    if ttl is None:
        return DEFAULT_TTL
    if isinstance(ttl, timedelta):
        return ttl
    return timedelta(seconds=parse_duration(ttl))


def token_create(
    config_path: Path,
    device: str,
    ttl: str | float | timedelta | None = None,
    gateway: str | None = None,
    *,
    user: str | None = None,
    now: Callable[[], datetime] = _utcnow,
    out: TextIO | None = None,
) -> int:
    """Create a one-time enrollment code for `device`; print the code alone on stdout.

    `gateway` (HOST:PORT) is the address PCs dial; default the agent's first `gateways`
    entry (often different: PCs use the DMZ's public name). `user`: the directory user
    the device will belong to; required with `directory:` (the PC enrolls with that
    user's password), refused without one.
    """
    command = "token create"
    try:
        config = load_agent_config(config_path)
        if config.pki is None:
            return _fail(command, f"{config.path}: pki: required to issue device certificates")
        if config.directory is not None and user is None:
            return _fail(
                command,
                f"{config.path} has a directory: --user NAME is required (the directory "
                "user who will hold the device)",
            )
        if config.directory is None and user is not None:
            return _fail(
                command, f"{config.path} has no directory: section; --user needs one to check"
            )
        if user is not None:
            check_username(user)
        lifetime = _parse_ttl(ttl)
        address: Address = parse_address(gateway) if gateway else config.gateways[0]
        fingerprint = pki.ca_fingerprint(pki.load_cert(config.pki.ca_cert))
        registry, audit = open_state(config)
        with registry:
            at = now()
            token_id, secret = registry.create_token(device, lifetime, at, user=user)
        code = EnrollmentCode(address, fingerprint, config.site, device, token_id, secret, user)
        audit.token_created(
            now=at,
            device=device,
            token_id=token_id,
            expires_at=at + lifetime,
            actor=_actor(),
            user=user,
        )
    except (ConfigError, RegistryError, CodeError, pki.PkiError, ValueError) as exc:
        return _fail(command, exc)
    print(code.encode(), file=out or sys.stdout)
    holder = f" (directory user {user!r})" if user is not None else ""
    print(
        f"enrollment code for device {device!r}{holder} of site {config.site!r}, via "
        f"{address}, valid until {(at + lifetime).isoformat()}; single use",
        file=sys.stderr,
    )
    return 0


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _status(row: DeviceRow, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.not_after is None:
        return "no-cert" if row.enrolled_at is None else "enrolled"
    return "expired" if row.not_after <= now else "active"


def _table(rows: Sequence[DeviceRow], now: datetime) -> str:
    header = ("DEVICE", "USER", "STATUS", "LAST SEEN", "ENROLLED", "CERT EXPIRES", "SERIAL")
    lines = [
        (
            r.name,
            r.user or "-",
            _status(r, now),
            _when(r.last_seen),
            _when(r.enrolled_at),
            _when(r.not_after),
            (r.serial or "-")[:16],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *lines)
    ]
    return "\n".join(out)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def device_list(
    config_path: Path,
    as_json: bool = False,
    *,
    now: Callable[[], datetime] = _utcnow,
    out: TextIO | None = None,
) -> int:
    """Print the registry's devices: a table, or a JSON list with `as_json`."""
    try:
        config = load_agent_config(config_path)
        registry, _ = open_state(config)
        with registry:
            rows = registry.list_devices()
    except (ConfigError, RegistryError) as exc:
        return _fail("device list", exc)
    stream = out or sys.stdout
    at = now()
    if as_json:
        data = [
            {
                "name": r.name,
                "user": r.user,
                "site": r.site,
                "status": _status(r, at),
                "enrolled_at": _iso(r.enrolled_at),
                "revoked_at": _iso(r.revoked_at),
                "last_seen": _iso(r.last_seen),
                "serial": r.serial,
                "not_after": _iso(r.not_after),
                "certificates": r.certificates,
            }
            for r in rows
        ]
        print(json.dumps(data, indent=2), file=stream)
    elif rows:
        print(_table(rows, at), file=stream)
    else:
        print("no devices yet (create an enrollment code with `relay token create`)", file=stream)
    return 0


def device_revoke(
    config_path: Path,
    name: str,
    *,
    force: bool = False,
    now: Callable[[], datetime] = _utcnow,
    out: TextIO | None = None,
) -> int:
    """Revoke device `name` for good; the running agent pushes it to every gateway.

    A name the registry does not know is refused unless `force`.
    """
    command = "device revoke"
    try:
        config = load_agent_config(config_path)
        registry, audit = open_state(config)
        with registry:
            if not force and registry.get_device(name) is None:
                return _fail(
                    command,
                    f"no device {name!r} in the registry of site {config.site!r} "
                    "(see `relay device list`); --force revokes the name anyway",
                )
            at = now()
            result = registry.revoke(name, at)
        trust_domain = pki.trust_domain_of_ca(pki.load_cert(config.tls.ca))
        uri = Identity.device(trust_domain, config.site, name).uri
    except (ConfigError, RegistryError, pki.PkiError, IdentityError) as exc:
        return _fail(command, exc)
    stream = out or sys.stdout
    if result is RevokeResult.ALREADY:
        print(f"device {name!r} was already revoked", file=stream)
        return 1
    audit.revocation(now=at, device=uri, actor=_actor())
    print(f"revoked {uri}; the agent closes its links at every gateway", file=stream)
    if result is RevokeResult.REVOKED_UNKNOWN:
        print(
            f"note: {name!r} was not in the registry (never enrolled or seen); "
            "revoked anyway (--force)",
            file=sys.stderr,
        )
    return 0
