"""`relay`: one command, three roles, and the tools IT uses around them.

Each subcommand imports only what it needs, so `relay gateway` never loads DICOM or
compression code. User errors (bad config, bad arguments, PKI problems) print one line
naming the file and key and exit 2; they never show a traceback. Anything else is a bug:
its traceback is printed and the status is 1. So USER_ERRORS holds only our own error
types, and the OSErrors a user can cause (a --dir that cannot be written, a port that is
taken) are turned into them where they happen, naming the file or key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from relay import __version__
from relay.net.tls import TlsConfigError
from relay.ops.config import ConfigError, format_duration, parse_duration
from relay.ops.control import ControlError
from relay.ops.privatefiles import PrivateFileError
from relay.trust.codes import CodeError
from relay.trust.identity import IdentityError
from relay.trust.pki import MAX_DEVICE_LIFETIME, PkiError

# Errors a user can fix: one line on stderr, exit status 2, no traceback. Our own types
# only: a ValueError or OSError from inside is a bug and keeps its traceback (status 1).
USER_ERRORS = (
    ConfigError,
    PkiError,
    TlsConfigError,
    IdentityError,
    CodeError,
    PrivateFileError,
    ControlError,
)
# ... and these, named rather than imported: importing them would load the sealed
# sessions, SQLite and the demo into `relay gateway` (which must not load relay.seal).
# One raised has had its module loaded.
LAZY_USER_ERRORS = (
    ("relay.agent.registry", "RegistryError"),
    ("relay.trust.enroll", "EnrollError"),
    ("relay_dev.demo", "DemoError"),
)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, USER_ERRORS):
        return True
    for module, name in LAZY_USER_ERRORS:
        loaded = sys.modules.get(module)
        error = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(error, type) and isinstance(exc, error):
            return True
    return False


def duration(most: timedelta) -> Callable[[str], timedelta]:
    """argparse type for --lifetime/--ttl, above 0 and at most `most`: a bad value is
    argparse's usage error (exit 2), never an OverflowError's traceback from timedelta."""

    def parse(text: str) -> timedelta:
        try:
            value = timedelta(seconds=parse_duration(text))
        except (ValueError, OverflowError) as exc:
            message = str(exc) if isinstance(exc, ValueError) else f"{text!r} is too long"
            raise argparse.ArgumentTypeError(message) from None
        if not timedelta(0) < value <= most:
            limit = format_duration(most.total_seconds())
            raise argparse.ArgumentTypeError(f"must be above 0s and at most {limit}, got {text}")
        return value

    return parse


# What the agent accepts: relay.agent.registry.MAX_TTL (not imported: that loads SQLite).
MAX_CODE_TTL = timedelta(days=30)


def _cmd_pki_init(args: argparse.Namespace) -> int:
    from relay.trust.pki import init_pki

    names = [n.strip() for n in args.gateway_name.split(",") if n.strip()]
    init_pki(Path(args.dir), args.trust_domain, args.site, names)
    print(f"wrote {args.dir}/ca.crt ca.key gateway.crt gateway.key agent.crt agent.key")
    return 0


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    from relay.trust.pki import issue_device

    issue_device(
        Path(args.dir), args.site, args.device, Path(args.out), args.lifetime, force=args.force
    )
    print(f"wrote {args.out}/device.crt device.key ca.crt")
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.configfile import load_gateway_config
    from gateway.service import run

    return run(Path(args.config), load_gateway_config)


def _cmd_agent(args: argparse.Namespace) -> int:
    from relay.agent.service import run

    return run(Path(args.config))


def _cmd_workstation(args: argparse.Namespace) -> int:
    if args.action != "run":  # a command to the running workstation
        from relay.workstation.control import run_command

        state_dir = Path(args.state_dir) if args.state_dir is not None else None
        return run_command(Path(args.config), args.action, as_json=args.json, state_dir=state_dir)
    if args.state_dir is not None:  # run takes it from the config file, as it always did
        print("relay workstation: --state-dir is for reload|stop|status", file=sys.stderr)
        return 2
    if args.log_file:  # no console (a scheduled task, pythonw): JSON lines to a file
        from relay.ops.logfile import open_log_file  # rotated by us: Windows cannot, open

        try:
            sys.stdout = sys.stderr = open_log_file(args.log_file)
        except OSError as exc:  # a directory, a missing parent: the operator's to fix
            why = exc.strerror or exc
            print(f"relay workstation: --log-file {args.log_file}: {why}", file=sys.stderr)
            return 2
    from relay.workstation.service import run

    return run(Path(args.config))


def _cmd_token_create(args: argparse.Namespace) -> int:
    from relay.agent.admin_cli import token_create

    return token_create(Path(args.config), args.device, args.ttl, args.gateway, user=args.user)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from relay.ops.secretinput import SecretReader
    from relay.trust.codes import MAX_CODE_CHARS
    from relay.trust.enroll import run_enroll

    # stdin's bytes, decoded by their BOM: text-mode stdin is the ANSI code page on Windows
    stdin = SecretReader(sys.stdin.buffer)
    code: str = args.code
    if code == "-":  # from stdin: keeps the secret out of the process list and history
        try:
            code = stdin.readline(MAX_CODE_CHARS + 2).strip()
        except UnicodeDecodeError:
            print("relay enroll: the code on stdin is not UTF-8 or UTF-16 text", file=sys.stderr)
            return 2
    return run_enroll(
        code,
        Path(args.dir),
        device=args.device,
        force=args.force,
        password_file=Path(args.password_file) if args.password_file else None,
        password_stdin=stdin if args.password_stdin else None,
    )


def _cmd_device_list(args: argparse.Namespace) -> int:
    from relay.agent.admin_cli import device_list

    return device_list(Path(args.config), as_json=args.json)


def _cmd_device_revoke(args: argparse.Namespace) -> int:
    from relay.agent.admin_cli import device_revoke

    return device_revoke(Path(args.config), args.name, force=args.force)


def _cmd_it_admin_passwd(args: argparse.Namespace) -> int:
    from relay.agent.itpages.admin_cli import passwd
    from relay.ops.secretinput import SecretReader

    # stdin's bytes, decoded by their BOM, as `relay enroll` reads them (relay.ops.secretinput)
    stdin = SecretReader(sys.stdin.buffer) if args.password_stdin else None
    return passwd(Path(args.file), args.user, stdin=stdin)


def _cmd_prefetch(args: argparse.Namespace) -> int:
    from relay.workstation.cache import cli

    return cli.prefetch(Path(args.config), args.studies)


def _cmd_cache(args: argparse.Namespace) -> int:
    from relay.workstation.cache import cli

    config = Path(args.config)
    if args.cache_command == "status":
        return cli.status(config, as_json=args.json, names=args.names)
    if args.cache_command == "wipe":
        return cli.wipe(config)
    return cli.evict(config, args.studies)


def _cmd_self_check(args: argparse.Namespace) -> int:
    from relay.selfcheck import run

    return run()


def _cmd_demo(args: argparse.Namespace) -> int:
    from relay_dev.demo import run

    code: int = run(Path(args.dir) if args.dir else None)
    return code


def _cmd_viewer_install(args: argparse.Namespace) -> int:
    from relay.workstation.viewer.install import ViewerInstallError, install_viewer
    from relay.workstation.viewer.pin import OHIF

    tarball = Path(args.tarball) if args.tarball else None
    try:  # its error type stays out of USER_ERRORS: importing it here keeps the CLI lazy
        where, fresh = install_viewer(
            Path(args.dir) if args.dir else None, tarball=tarball, force=args.force
        )
    except ViewerInstallError as exc:
        print(f"relay viewer install: {exc}", file=sys.stderr)
        return 2
    state = "installed" if fresh else "already installed"
    print(f"{OHIF.name} {OHIF.version} {state} in {where}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pki = sub.add_parser("pki", help="make a site PKI or an offline device certificate")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = pki_sub.add_parser("init", help="create the site CA, gateway and agent certificates")
    init.add_argument("--dir", required=True)
    init.add_argument("--trust-domain", required=True)
    init.add_argument("--site", required=True)
    init.add_argument(
        "--gateway-name",
        required=True,
        help="names and IP addresses devices and agents use for the gateway, comma-separated",
    )
    init.set_defaults(func=_cmd_pki_init)
    issue = pki_sub.add_parser("issue", help="issue a device certificate offline")
    issue.add_argument("--dir", required=True, help="the directory made by `pki init`")
    issue.add_argument("--site", required=True)
    issue.add_argument("--device", required=True)
    issue.add_argument("--out", required=True)
    issue.add_argument(
        "--lifetime",
        type=duration(MAX_DEVICE_LIFETIME),
        default="30d",
        help="e.g. 30d, 12h (default 30d, at most 366d)",
    )
    issue.add_argument("--force", action="store_true", help="replace the identity in --out")
    issue.set_defaults(func=_cmd_pki_issue)

    for role, func in (("gateway", _cmd_gateway), ("agent", _cmd_agent)):
        cmd = sub.add_parser(role, help=f"run the {role}")
        cmd.add_argument("--config", required=True)
        cmd.set_defaults(func=func)
    ws = sub.add_parser(
        "workstation",
        help="run the workstation, or reload|stop|status the one running with --config",
    )
    ws.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=("run", "reload", "stop", "status"),
        help="run (default); reload, stop or status: over the running one's control endpoint",
    )
    ws.add_argument("--config", required=True)
    ws.add_argument("--json", action="store_true", help="reload|stop|status: the answer as JSON")
    ws.add_argument(
        "--state-dir",
        metavar="DIR",
        help="reload|stop|status: the running workstation's state_dir, so that --config is "
        "not read (needed when it is not a regular file, e.g. a FIFO)",
    )
    ws.add_argument(
        "--log-file",
        metavar="FILE",
        help="run: append the JSON log lines (and any error) to FILE instead of stdout; "
        "FILE is rotated at 10 MiB (FILE.1 ... FILE.5 kept)",
    )
    ws.set_defaults(func=_cmd_workstation)

    token = sub.add_parser("token", help="one-time enrollment codes (on the agent's machine)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser(
        "create", help="print a one-time enrollment code for a device, alone on stdout"
    )
    create.add_argument("--config", required=True, help="the agent's config file")
    create.add_argument("--device", required=True, help="the device name the code is for")
    create.add_argument(
        "--user",
        help="the directory user who will hold the device (required with directory:)",
    )
    create.add_argument(
        "--ttl",
        type=duration(MAX_CODE_TTL),
        default="24h",
        help="how long the code stays valid (default 24h, at most 30d)",
    )
    create.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="the gateway address PCs dial (default: the agent's first gateways entry)",
    )
    create.set_defaults(func=_cmd_token_create)

    enroll = sub.add_parser("enroll", help="enroll this PC with a code from IT")
    enroll.add_argument(
        "code", metavar="CODE", help="the enrollment code, or - to read it from stdin"
    )
    enroll.add_argument(
        "--dir", required=True, help="where to write device.crt, device.key and ca.crt"
    )
    enroll.add_argument("--device", help="the device name (default: the one in the code)")
    enroll.add_argument(
        "--force", action="store_true", help="replace the identity already in --dir"
    )
    secret = enroll.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the directory password from FILE's first line (default: ask)",
    )
    secret.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the directory password from the next line of stdin (after CODE if -)",
    )
    enroll.set_defaults(func=_cmd_enroll)

    device = sub.add_parser("device", help="list or revoke enrolled devices")
    device_sub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    listing = device_sub.add_parser("list", help="the agent's device registry")
    listing.add_argument("--config", required=True, help="the agent's config file")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=_cmd_device_list)
    revoke = device_sub.add_parser(
        "revoke", help="revoke a device for good; the agent closes its links everywhere"
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--config", required=True, help="the agent's config file")
    revoke.add_argument(
        "--force",
        action="store_true",
        help="revoke a name the registry does not know (a device issued offline)",
    )
    revoke.set_defaults(func=_cmd_device_revoke)

    it_admin = sub.add_parser("it-admin", help="local IT admins of the agent's IT pages")
    it_sub = it_admin.add_subparsers(dest="it_command", required=True, metavar="ACTION")
    pw = it_sub.add_parser("passwd", help="add an IT admin or change their password")
    pw.add_argument("--file", required=True, help="the agent's it_pages.admins_file")
    pw.add_argument("--user", required=True, help="the admin's name")
    pw.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    pw.set_defaults(func=_cmd_it_admin_passwd)

    pre = sub.add_parser("prefetch", help="queue studies in the running workstation's cache")
    pre.add_argument("studies", nargs="+", metavar="STUDY_UID")
    pre.add_argument("--config", required=True, help="the workstation's config file")
    pre.set_defaults(func=_cmd_prefetch)
    cache = sub.add_parser("cache", help="the running workstation's study cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    st = cache_sub.add_parser("status", help="what is cached, filling, how far")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.add_argument("--names", action="store_true", help="show patient names (off by default)")
    cache_sub.add_parser("wipe", help="erase the cache now")
    ev = cache_sub.add_parser("evict", help="remove studies (by label or study UID)")
    ev.add_argument("studies", nargs="+", metavar="STUDY")
    for action in cache_sub.choices.values():
        action.add_argument("--config", required=True, help="the workstation's config file")
        action.set_defaults(func=_cmd_cache)

    viewer = sub.add_parser("viewer", help="the OHIF web viewer the workstation serves")
    viewer_sub = viewer.add_subparsers(dest="viewer_command", required=True, metavar="ACTION")
    vinstall = viewer_sub.add_parser(
        "install", help="download the pinned OHIF release, check its hash, unpack it"
    )
    vinstall.add_argument("--dir", help="where to (default: the platform's data directory)")
    vinstall.add_argument("--tarball", help="a local copy of the npm tarball (offline PCs)")
    vinstall.add_argument("--force", action="store_true", help="reinstall even if present")
    vinstall.set_defaults(func=_cmd_viewer_install)

    check = sub.add_parser(
        "self-check", help="load the workstation's modules and try each pixel codec (a build)"
    )
    check.set_defaults(func=_cmd_self_check)

    demo = sub.add_parser("demo", help="the whole chain on loopback with an embedded PACS")
    demo.add_argument("--dir", help="where to keep the demo's certificates and configs")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if is_user_error(exc):
            print(f"relay: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
