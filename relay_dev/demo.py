"""`relay demo`: the whole chain on loopback, with an embedded PACS and sample studies.

One command shows the product working on a fresh machine. It makes a throw-away
development PKI, starts an embedded PACS (pynetdicom, in this process) holding a CT and
an MR study with realistic pixel data, then the gateway, the agent and the workstation
as real child processes (`python -m relay.cli ROLE --config FILE`, exactly what runs in
production), waits until a C-ECHO through the whole chain succeeds, and prints what to
run. Ctrl-C or SIGTERM stops the roles in order (workstation, agent, gateway: each
drains) and exits 0.

Everything lives in one directory (default `./demo-state`, which is git-ignored): the PKI,
the three config files, the agent's state (device registry, audit trail), the
workstation's (`workstation-state/`: its lock, control.json, study cache), the logs of
each role (`logs/*.log`) and `demo.json`, the addresses and study UIDs for scripts. It is
wiped at the next start, and only if an earlier demo made it (it holds `.relay-demo`);
a directory in use by a running demo is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from relay.trust.pki import PkiError

if TYPE_CHECKING:
    from relay_dev.pacs import EmbeddedPacs
    from relay_dev.samples import EncodedInstance

__all__ = ["DEFAULT_DIR", "DemoError", "DemoPorts", "run"]

DEFAULT_DIR = Path("demo-state")
MARKER = ".relay-demo"  # holds the pid of the demo that owns the directory
HOST = "127.0.0.1"
SITE = "demo"
TRUST_DOMAIN = "demo.relay.example"
DEVICE = "demo-workstation"
WORKSTATION_AE = "RELAY"
PACS_AE = "RELAYPACS"
VIEWER_AE = "VIEWER"
ROLES = ("gateway", "agent", "workstation")

READY_TIMEOUT = 60.0  # seconds for the whole chain to come up
STOP_GRACE = 5  # seconds each role may drain (its drain_grace)
STOP_TIMEOUT = 15.0  # seconds to wait for a role to exit after SIGTERM, then SIGKILL
ECHO_TIMEOUT = 10.0  # seconds for one C-ECHO through the chain
START_ATTEMPTS = 3  # a port taken between our probe and a role's bind: start again
PACS_PORT = 4242

log = logging.getLogger(__name__)


class DemoError(Exception):
    """The demo cannot start (directory in use, a role died, the chain never came up)."""


class PortTaken(DemoError):
    """A role could not listen on the port chosen for it (another process took it)."""

    def __init__(self, role: str, port: int) -> None:
        super().__init__(f"the {role} could not listen on port {port}")
        self.port = port


# What a role says, as its one-line exit (relay.ops.binding), when its port is taken.
_LISTEN_FAILED = re.compile(r"cannot listen on [^\s:]+:(\d+)")


@dataclass(frozen=True)
class DemoPorts:
    """Loopback ports: the documented defaults, or free ones where those are taken."""

    gateway: int
    gateway_metrics: int
    agent_metrics: int
    workstation_metrics: int
    dicom: int
    pacs: int
    dicomweb: int = 8088  # DICOMweb and the OHIF viewer at /, in the browser
    viewer: int = 11113  # where the user's viewer (or storescp) receives C-MOVEs

    @classmethod
    def pick(cls, pacs: int, avoid: frozenset[int] = frozenset()) -> DemoPorts:
        """Ports for the roles (the PACS is already listening on `pacs`). A port may be
        taken before the role binds it: `run` then starts again, avoiding it."""
        return cls(
            gateway=pick_port(8443, avoid),
            gateway_metrics=pick_port(9101, avoid),
            agent_metrics=pick_port(9102, avoid),
            workstation_metrics=pick_port(9103, avoid),
            dicom=pick_port(11112, avoid),
            pacs=pacs,
            dicomweb=pick_port(8088, avoid),
        )


def pick_port(preferred: int, avoid: frozenset[int] = frozenset()) -> int:
    """`preferred` if a role could bind it on 127.0.0.1 now, else any free port.

    The probe binds as the roles do, with SO_REUSEADDR, so a port whose last connections
    are in TIME_WAIT (a demo stopped a moment ago) counts as free and a restart keeps its
    ports. The port is released again before the role binds it: see PortTaken.
    """
    for port in (preferred, 0):
        if port in avoid:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
            if chosen not in avoid:
                return chosen
    raise DemoError("no free port on 127.0.0.1")


# -- the directory ----------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_directory(directory: Path) -> Path:
    """An empty directory that this demo owns; refuses one it did not make, or in use."""
    directory = directory.resolve()
    try:
        return _prepare_directory(directory)
    except OSError as exc:  # --dir not writable, a file in the way...: the user's to fix
        raise DemoError(f"cannot use {directory}: {exc.strerror or exc}") from None


def _prepare_directory(directory: Path) -> Path:
    marker = directory / MARKER
    if directory.exists():
        if not directory.is_dir():
            raise DemoError(f"{directory} exists and is not a directory")
        if marker.is_file():
            text = marker.read_text().strip()
            if text.isdigit() and int(text) != os.getpid() and _pid_alive(int(text)):
                raise DemoError(
                    f"{directory} is in use by a running demo (pid {text}); stop it, "
                    "or pass --dir for another directory"
                )
            shutil.rmtree(directory)
        elif any(directory.iterdir()):
            raise DemoError(
                f"{directory} is not empty and was not made by `relay demo`; "
                "pass --dir with a new or empty directory"
            )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    (directory / "logs").mkdir()
    return directory


def write_pki(directory: Path) -> None:
    """A development PKI: site CA, gateway and agent certificates, and one device."""
    from relay.trust.pki import init_pki, issue_device

    init_pki(directory / "pki", TRUST_DOMAIN, SITE, ["localhost", HOST])
    issue_device(directory / "pki", SITE, DEVICE, directory / "workstation-identity",
                 timedelta(days=30))  # fmt: skip


def write_configs(directory: Path, ports: DemoPorts) -> dict[str, Path]:
    """The three roles' config files, with paths relative to the directory."""
    fast = f"reconnect: {{initial: 0.2s, max: 2s}}\ndrain_grace: {STOP_GRACE}s\n"
    texts = {
        "gateway": (
            f"listen: {HOST}:{ports.gateway}\n"
            f"metrics_listen: {HOST}:{ports.gateway_metrics}\n"
            "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
            f"drain_grace: {STOP_GRACE}s\n"
        ),
        "agent": (
            f"site: {SITE}\n"
            f"gateways: ['{HOST}:{ports.gateway}']\n"
            "tls: {cert: pki/agent.crt, key: pki/agent.key, ca: pki/ca.crt}\n"
            "pki: {ca_cert: pki/ca.crt, ca_key: pki/ca.key}\n"
            "state_dir: agent-state/\n"
            f"metrics_listen: {HOST}:{ports.agent_metrics}\n"
            f"pacs: {{ae_title: {PACS_AE}, host: {HOST}, port: {ports.pacs},\n"
            f"       calling_ae_title: {WORKSTATION_AE}, retrieve: get}}\n" + fast
        ),
        "workstation": (
            f"gateway: {HOST}:{ports.gateway}\n"
            "identity_dir: workstation-identity/\n"
            # in the demo's directory (lock, control.json, study cache), wiped with it;
            # the default is the user's data directory, which no demo run would clean
            "state_dir: workstation-state/\n"
            f"metrics_listen: {HOST}:{ports.workstation_metrics}\n"
            "dicom:\n"
            f"  listen: {HOST}:{ports.dicom}\n"
            f"  ae_title: {WORKSTATION_AE}\n"
            f"  destinations: {{{VIEWER_AE}: '{HOST}:{ports.viewer}'}}\n"
            # the viewer from `relay viewer install` (make demo runs it), in its default dir
            f"dicomweb: {{listen: '{HOST}:{ports.dicomweb}', viewer: true}}\n" + fast
        ),
    }
    paths = {}
    for role, text in texts.items():
        path = directory / f"{role}.yaml"
        path.write_text(f"# written by `relay demo`; thrown away at the next run\n{text}")
        paths[role] = path
    return paths


# -- the processes ----------------------------------------------------------------------


class Role:
    """One role as a child process of `relay demo`, its output in a log file."""

    def __init__(self, name: str, config: Path, log_path: Path) -> None:
        self.name = name
        self.config = config
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "relay.cli", self.name, "--config", str(self.config)]
        with self.log_path.open("ab") as out:
            # A session of its own: Ctrl-C reaches only `relay demo`, which then stops
            # the roles in order instead of all of them at once.
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.config.parent, start_new_session=True,
            )  # fmt: skip

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL past STOP_TIMEOUT; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            return None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET `url`, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def echo_through(port: int, timeout: float = ECHO_TIMEOUT) -> bool:
    """A C-ECHO to the workstation's DICOM node succeeds (it reaches the PACS)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from relay.dicom import contexts

    ae = AE(ae_title="RELAYDEMO")
    ae.add_requested_context(Verification)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, timeout)
    assoc = ae.associate(HOST, port, ae_title=WORKSTATION_AE, evt_handlers=[contexts.NODELAY])
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()


def exit_error(role: Role, code: int) -> DemoError:
    """Why `role` exited: PortTaken if it could not listen (then `run` starts again)."""
    tail = role.tail()
    taken = _LISTEN_FAILED.search(tail)
    if code == 2 and taken is not None:
        return PortTaken(role.name, int(taken.group(1)))
    return DemoError(
        f"the {role.name} exited with status {code}; its log ({role.log_path}) ends with:\n{tail}"
    )


def wait_ready(roles: list[Role], ports: DemoPorts, stop: threading.Event) -> None:
    """Until the workstation and agent are ready and a C-ECHO passes the whole chain."""
    deadline = time.monotonic() + READY_TIMEOUT
    urls = [
        f"http://{HOST}:{ports.workstation_metrics}/readyz",
        f"http://{HOST}:{ports.agent_metrics}/readyz",
    ]
    viewer = viewer_url(ports)  # 200, or 503 with the page saying how to install it
    while not stop.is_set():
        for role in roles:
            code = role.exited()
            if code is not None:
                raise exit_error(role, code)
        ready = all(http_status(url) == 200 for url in urls)
        if ready and http_status(viewer) in (200, 503) and echo_through(ports.dicom):
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {r.name} ({r.log_path})\n{r.tail(8)}" for r in roles)
            raise DemoError(f"the chain did not come up within {READY_TIMEOUT:.0f} s\n{tails}")
        stop.wait(0.3)


# -- the PACS ---------------------------------------------------------------------------


def start_pacs(directory: Path) -> tuple[EmbeddedPacs, dict[str, str]]:
    """The embedded PACS with the demo studies, listening on PACS_PORT or, if that is
    taken, on any port (it binds in this process: nothing can take it in between);
    returns it and {modality: study UID}."""
    from relay_dev.pacs import EmbeddedPacs, MemoryStore
    from relay_dev.samples import demo_studies

    handler = logging.FileHandler(directory / "logs" / "pacs.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pynetdicom", "relay"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    studies = demo_studies()
    for port in (PACS_PORT, 0):
        pacs = EmbeddedPacs(MemoryStore(studies), ae_title=PACS_AE, host=HOST, port=port)
        try:
            pacs.start()
        except OSError:
            if port == 0:
                raise
            continue
        break
    return pacs, study_uids(studies)


def study_uids(instances: list[EncodedInstance]) -> dict[str, str]:
    """The study UID of each modality's study, read from the instances themselves."""
    from relay_dev.pacs import header_of

    uids: dict[str, str] = {}
    for inst in instances:
        header = header_of(inst.data, inst.transfer_syntax)
        uids.setdefault(str(header.Modality), str(header.StudyInstanceUID))
    return uids


# -- what to run ------------------------------------------------------------------------


def viewer_url(ports: DemoPorts) -> str:
    return f"http://{HOST}:{ports.dicomweb}/"


def viewer_installed() -> str | None:
    """The installed OHIF version in the workstation's default viewer dir, or None."""
    from relay.workstation.viewer.install import default_viewer_dir, installed_release

    marker = installed_release(default_viewer_dir())
    return None if marker is None else marker.get("version", "?")


def browser_lines(ports: DemoPorts, ct: str) -> list[str]:
    """What to open in a browser: the OHIF viewer and its DICOMweb."""
    url = viewer_url(ports)
    version = viewer_installed()
    lines = [
        "Read in the browser (the OHIF viewer, served by the workstation on loopback):",
        f"  open {url}",
        f"  the CT directly: {url}viewer?StudyInstanceUIDs={ct}",
    ]
    if version is None:
        lines.append("  (the viewer is not installed yet: run `relay viewer install`, then reload)")
    else:
        lines.append(f"  (OHIF {version}; answered on loopback names only: {HOST}, localhost)")
    lines.append(f"  DICOMweb for other clients: {url}dicom-web")
    return lines


def instructions(directory: Path, ports: DemoPorts, uids: dict[str, str]) -> str:
    node = f"-aec {WORKSTATION_AE} {HOST} {ports.dicom}"
    ct, mr = uids.get("CT", "?"), uids.get("MR", "?")
    have_dcmtk = shutil.which("findscu") is not None
    py = f"{sys.executable} -m pynetdicom"
    out = "/tmp/relay-demo"
    lines = [
        "",
        "DMZ Relay demo is running: viewer -> workstation -> gateway -> agent -> PACS,",
        "all on 127.0.0.1, over mutually authenticated TLS 1.3.",
        "",
        f"Local DICOM node (what a viewer talks to): AE title {WORKSTATION_AE}, "
        f"host {HOST}, port {ports.dicom}",
        f"The PACS holds a CT study (DOE^JANE, {ct})",
        f"           and an MR study (ROE^RICHARD, {mr}).",
        f"The PACS itself, to compare: AE title {PACS_AE}, host {HOST}, port {ports.pacs}",
        "",
        "Try it with DCMTK" + ("" if have_dcmtk else " (apt-get install dcmtk)") + ":",
        f"  echoscu {node}",
        "  findscu -S -k QueryRetrieveLevel=STUDY -k PatientName= -k StudyDescription= "
        f"-k StudyInstanceUID= {node}",
        f"  getscu -od {out} -k QueryRetrieveLevel=STUDY -k StudyInstanceUID={ct} {node}",
        f"  movescu -aem {VIEWER_AE} -k QueryRetrieveLevel=STUDY -k StudyInstanceUID={mr} {node}",
        f"    (C-MOVE delivers to {VIEWER_AE} at {HOST}:{ports.viewer}; start a receiver "
        "there first, on loopback only:",
        f"     {py} storescp -ba {HOST} -aet {VIEWER_AE} -od {out}-move {ports.viewer} &)",
        "",
        "Or with pynetdicom's apps (installed with relay):",
        f"  {py} echoscu {HOST} {ports.dicom} -aec {WORKSTATION_AE}",
        f"  {py} getscu {HOST} {ports.dicom} -aec {WORKSTATION_AE} -od {out} "
        f"-k QueryRetrieveLevel=STUDY -k StudyInstanceUID={mr}",
        "",
        *browser_lines(ports, ct),
        "",
        "A viewer (Weasis, Horos, OsiriX, MicroDicom, ...): add the DICOM node",
        f"  AE title {WORKSTATION_AE}, host {HOST}, port {ports.dicom}; retrieve with C-GET,",
        f"  or C-MOVE with the viewer's own listener as AE title {VIEWER_AE} "
        f"on port {ports.viewer}.",
        "",
        "Metrics, health and readiness of each role:",
        f"  gateway      http://{HOST}:{ports.gateway_metrics}/metrics",
        f"  agent        http://{HOST}:{ports.agent_metrics}/metrics",
        f"  workstation  http://{HOST}:{ports.workstation_metrics}/metrics   "
        "(/healthz, /readyz beside each)",
        "",
        f"Logs: {directory / 'logs'}/{{gateway,agent,workstation,pacs}}.log; "
        f"audit trail: {directory / 'agent-state' / 'audit.jsonl'}",
        f"Configs, PKI and addresses (demo.json): {directory}",
        "Press Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines)


def write_summary(
    directory: Path, ports: DemoPorts, uids: dict[str, str], roles: list[Role]
) -> None:
    """demo.json: where everything is, for scripts and tests."""
    summary: dict[str, Any] = {
        "pid": os.getpid(),
        "pids": {role.name: role.popen.pid for role in roles if role.popen is not None},
        "host": HOST,
        "ports": asdict(ports),
        "ae_titles": {"workstation": WORKSTATION_AE, "pacs": PACS_AE, "viewer": VIEWER_AE},
        "studies": uids,
        "viewer": viewer_url(ports),
        "logs": {name: str(directory / "logs" / f"{name}.log") for name in (*ROLES, "pacs")},
    }
    tmp = directory / "demo.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(directory / "demo.json")


# -- the command ------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` (restored afterwards)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _say(text: str) -> None:
    print(text, flush=True)


def stop_roles(roles: list[Role], *, quiet: bool = False) -> bool:
    """Stop the roles in reverse start order; True if each drained and exited 0."""
    clean = True
    for role in reversed(roles):
        code = role.stop()
        if code not in (0, None) or (code is None and role.popen is not None):
            clean = False
            if not quiet:
                _say(f"relay demo: the {role.name} exited with status {code}; see {role.log_path}")
    return clean


def supervise(roles: list[Role], stop: threading.Event) -> bool:
    """Until `stop`; False if a role died on its own meanwhile."""
    while not stop.wait(0.5):
        for role in roles:
            code = role.exited()
            if code is not None:
                print(
                    f"relay demo: the {role.name} exited with status {code}; its log "
                    f"({role.log_path}) ends with:\n{role.tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                return False
    return True


def start_roles(root: Path, pacs: int, stop: threading.Event) -> tuple[DemoPorts, list[Role]]:
    """Configs and the three roles, up and ready; started again (other ports) if a port
    was taken between the probe and a role's bind, at most START_ATTEMPTS times."""
    avoid: frozenset[int] = frozenset()
    for attempt in range(1, START_ATTEMPTS + 1):
        ports = DemoPorts.pick(pacs, avoid)
        configs = write_configs(root, ports)
        roles: list[Role] = []
        try:
            for name in ROLES:
                role = Role(name, configs[name], root / "logs" / f"{name}.log")
                role.start()
                roles.append(role)
            wait_ready(roles, ports, stop)
            return ports, roles
        except PortTaken as exc:
            stop_roles(roles, quiet=True)
            if attempt == START_ATTEMPTS:
                raise
            avoid |= {exc.port}
            _say(f"relay demo: {exc} (taken meanwhile); starting again on another port")
        except BaseException:
            stop_roles(roles)
            raise
    raise AssertionError("unreachable")


def run(directory: Path | None) -> int:
    """`relay demo [--dir DIR]`: 0 after a clean Ctrl-C/SIGTERM, 1 on failure, 2 on misuse."""
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            root = prepare_directory(directory or DEFAULT_DIR)
        except DemoError as exc:
            print(f"relay demo: {exc}", file=sys.stderr)
            return 2
        roles: list[Role] = []
        pacs: EmbeddedPacs | None = None
        failed = True
        try:
            _say(f"relay demo: making a development PKI and configs in {root}")
            write_pki(root)
            _say("relay demo: loading the PACS")
            pacs, uids = start_pacs(root)
            _say("relay demo: starting gateway, agent and workstation")
            ports, roles = start_roles(root, pacs.port, stop)
            if not stop.is_set():
                # What to run is printed before demo.json appears: scripts (and the tests)
                # take demo.json as the sign that the demo is up and has said so.
                _say(instructions(root, ports, uids))
                write_summary(root, ports, uids, roles)
            failed = not supervise(roles, stop)
        except (DemoError, PkiError, OSError) as exc:
            print(f"relay demo: {exc}", file=sys.stderr, flush=True)
        except ImportError as exc:
            print(f"relay demo: DICOM support is missing ({exc}); install the project with "
                  "`pip install -e '.[test]'` (or run `make demo`)", file=sys.stderr)  # fmt: skip
        finally:
            _say("relay demo: stopping")
            clean = stop_roles(roles)
            if pacs is not None:
                pacs.stop()
            with contextlib.suppress(OSError):
                (root / MARKER).write_text("stopped\n")
        if clean and not failed:
            _say(f"relay demo: stopped cleanly; logs in {root / 'logs'}")
            return 0
        return 1
