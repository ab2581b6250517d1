"""`relay`: one command, three roles, and the tools IT uses around them.

Each subcommand imports only what it needs, so `relay gateway` never loads DICOM or
compression code. User errors (bad config, bad arguments, PKI problems) print one line
naming the file and key and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from relay import __version__
from relay.config import ConfigError, parse_duration
from relay.identity import IdentityError
from relay.pki import PkiError
from relay.tls import TlsConfigError

# Errors a user can fix: one line on stderr, exit status 2, no traceback.
USER_ERRORS = (ConfigError, PkiError, TlsConfigError, IdentityError, ValueError, OSError)


def _cmd_pki_init(args: argparse.Namespace) -> int:
    from relay.pki import init_pki

    names = [n.strip() for n in args.gateway_name.split(",") if n.strip()]
    init_pki(Path(args.dir), args.trust_domain, args.site, names)
    print(f"wrote {args.dir}/ca.crt ca.key gateway.crt gateway.key agent.crt agent.key")
    return 0


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    from relay.pki import issue_device

    lifetime = timedelta(seconds=parse_duration(args.lifetime))
    issue_device(Path(args.dir), args.site, args.device, Path(args.out), lifetime)
    print(f"wrote {args.out}/device.crt device.key ca.crt")
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.service import run

    return run(Path(args.config))


def _cmd_agent(args: argparse.Namespace) -> int:
    from relay.agent.service import run

    return run(Path(args.config))


def _cmd_workstation(args: argparse.Namespace) -> int:
    from relay.workstation.service import run

    return run(Path(args.config))


def _cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run

    code: int = run(Path(args.dir) if args.dir else None)
    return code


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
    issue.add_argument("--lifetime", default="30d", help="e.g. 30d, 12h (default 30d)")
    issue.set_defaults(func=_cmd_pki_issue)

    for role, func in (
        ("gateway", _cmd_gateway),
        ("agent", _cmd_agent),
        ("workstation", _cmd_workstation),
    ):
        cmd = sub.add_parser(role, help=f"run the {role}")
        cmd.add_argument("--config", required=True)
        cmd.set_defaults(func=func)

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
        if isinstance(exc, USER_ERRORS):
            print(f"relay: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
