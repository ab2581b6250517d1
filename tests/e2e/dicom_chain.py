"""The DICOM chain as real processes: an embedded PACS, `relay gateway|agent|workstation`.

`DicomChain` writes a development PKI and the three roles' configs, starts them from the
CLI (optionally inside a network namespace, next to Orthanc) and waits until a C-ECHO
passes through the whole chain. `PacsProcess` runs relay.dicom's EmbeddedPacs in a small
process of its own (this file run as a script), so that its work neither competes with
the test for the GIL nor hides in the test's memory. `NsForwarder` lets a process on this
loopback reach a DICOM node inside a namespace (storescp binds every address, so it only
ever runs in one). Every wait is bounded; every process is stopped by its own pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` when run as a script

from tests.e2e.chain import HOST, RELAY, ROOT, Proc, rss_kb
from tests.ports import reserve

WAIT = 45.0  # seconds for processes to come up
PACS_AE = "RELAYPACS"
RELAY_AE = "RELAY"
LIMITS = "limits: {keepalive_interval: 1s, keepalive_timeout: 3s}\n"


# -- the PACS in a process of its own --------------------------------------------------


@dataclass
class PacsProcess:
    """EmbeddedPacs in a child process (this file as a script); `events()` reads its counters.

    `data`: "demo" (relay_dev.samples.demo_studies: a CT and an MR study) or "none";
    `synthetic_bytes`: also a generated study of at least that size (SyntheticStore, never
    held in memory); `send_delay`: seconds before each sent instance.
    """

    workdir: Path
    data: str = "demo"
    synthetic_bytes: int = 0
    send_delay: float = 0.0
    port: int = 0
    ae_title: str = PACS_AE
    proc: Proc | None = None

    @property
    def port_file(self) -> Path:
        return self.workdir / "pacs.port"

    @property
    def events_file(self) -> Path:
        return self.workdir / "pacs.events.json"

    def start(self, within: float = 120.0) -> PacsProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        argv = [
            sys.executable, str(Path(__file__).resolve()), "pacs",
            "--port", str(self.port), "--ae-title", self.ae_title, "--data", self.data,
            "--synthetic-bytes", str(self.synthetic_bytes),
            "--send-delay", str(self.send_delay),
            "--port-file", str(self.port_file), "--events-file", str(self.events_file),
        ]  # fmt: skip
        self.proc = Proc("pacs", argv, self.workdir / "pacs.log")
        self.proc.start()
        deadline = time.monotonic() + within
        while not self.port_file.exists():
            assert self.proc.popen is not None
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the PACS did not start\n{self.proc.output()[-3000:]}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def running(self) -> bool:
        return (
            self.proc is not None
            and self.proc.popen is not None
            and (self.proc.popen.poll() is None)
        )

    def events(self) -> dict[str, int]:
        """The PACS's counters (associations, finds, gets, stores, cancels, ...), ~0.1 s old."""
        try:
            data: dict[str, int] = json.loads(self.events_file.read_text())
        except (OSError, ValueError):
            return {}
        return data


def _serve_pacs(args: argparse.Namespace) -> int:
    """The PACS process: serve until SIGTERM, writing the port once it listens."""
    import logging

    from relay_dev.pacs import EmbeddedPacs, MemoryStore, SyntheticStore
    from relay_dev.samples import SyntheticStudy, demo_studies

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    store: Any
    if args.synthetic_bytes:
        study = SyntheticStudy.of_size(args.synthetic_bytes)
        store = SyntheticStore(study)
        for k in range(64):  # fill the phantom caches before anyone measures anything
            study.instance(round(k * (study.count - 1) / 63))
    else:
        store = MemoryStore()
    pacs = EmbeddedPacs(
        store, ae_title=args.ae_title, host=HOST, port=args.port, send_delay=args.send_delay,
        timeout=30,
    )  # fmt: skip
    if args.data == "demo":
        pacs.add(demo_studies())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pacs.start()
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(pacs.port))
    tmp.replace(args.port_file)
    print(f"PACS {args.ae_title} listening on {HOST}:{pacs.port}", flush=True)
    names = ("associations", "echoes", "finds", "gets", "moves", "stores", "cancels",
             "instances_sent", "store_failures")  # fmt: skip
    events_tmp = Path(args.events_file + ".tmp")
    while not stop.wait(0.1):
        counters = {name: getattr(pacs.events, name) for name in names}
        events_tmp.write_text(json.dumps(counters))
        events_tmp.replace(args.events_file)
    # Stopped, a PACS's associations end with it (the agent's spare one would otherwise
    # keep this process alive until its idle timeout, and the caller waits for that).
    pacs.abort_all()
    pacs.stop()
    return 0


# -- the relay's three processes -------------------------------------------------------


@dataclass
class DicomChain:
    """PKI, configs and the three roles for site `main`, with a PACS behind the agent.

    With `ns`, every role runs inside that namespace (`ip netns exec`) and every address,
    the PACS's included, is that namespace's loopback. `destinations` are the
    workstation's C-MOVE destinations (AE title -> port on 127.0.0.1); `retrieve` is the
    agent's `pacs.retrieve` (with "move", `move_port()` is where it receives).

    Every listener binds port 0 and `ports[name]` is the port its process reported
    ("gateway_metrics", "agent_metrics", "ws_metrics", "dicom"); a port the configs name
    before their processes run ("gateway") is reserved for the whole test (`reserved`).
    """

    tmp: Path
    pacs_port: int
    pacs_ae: str = PACS_AE
    ns: Any = None  # interop.harness.NetNS
    destinations: dict[str, int] = field(default_factory=dict)
    retrieve: str = "get"
    move_ae: str = "RELAYAGENT"
    pacs_timeout: str = "10s"
    reserved: dict[str, socket.socket] = field(default_factory=dict)
    ws_extra: str = ""  # more workstation YAML (cache:, prefetch:)
    resume_window: str = ""  # the workstation's dicom.resume_window ("": its default)
    agent_extra: str = ""  # more agent YAML (pki: for revocation)
    pacs_extra: str = ""  # more keys of the agent's pacs: mapping (", pixel_codecs: htj2k")
    procs: dict[str, Proc] = field(default_factory=dict)
    # which process reports which port
    reporters: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            "gateway_metrics": ("gateway", "metrics"),
            "agent_metrics": ("agent", "metrics"),
            "ws_metrics": ("ws1", "metrics"),
            "dicom": ("ws1", "dicom"),
            "move": ("agent", "move"),
        }
    )

    def reserve(self, name: str) -> int:
        """A socket bound now (in the namespace, with one), kept until `stop_all`."""
        make = None if self.ns is None else self.ns.socket
        sock = self.reserved[name] = reserve(make=make)
        return int(sock.getsockname()[1])

    def port(self, name: str) -> int:
        """A reserved port, or the one its process reported (waiting for it)."""
        if name in self.reserved:
            return int(self.reserved[name].getsockname()[1])
        proc, what = self.reporters[name]
        return self.procs[proc].listening(what).port

    @property
    def ports(self) -> _Ports:
        return _Ports(self)

    def move_port(self) -> int:
        """Where the agent receives the PACS's C-MOVE (`retrieve: move`)."""
        return self.port("move")

    def setup(self) -> DicomChain:
        from relay.trust.pki import init_pki, issue_device

        init_pki(self.tmp / "pki", "hospital.test", "main", ["localhost", HOST])
        issue_device(self.tmp / "pki", "main", "ws1", self.tmp / "ws1", timedelta(days=1))
        self.reserve("gateway")
        (self.tmp / "gateway.yaml").write_text(
            f"listen: {HOST}:{self.ports['gateway']}\n"  # reserved
            f"metrics_listen: {HOST}:0\n"
            "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
            "drain_grace: 2s\n" + LIMITS
        )
        move = (
            f", move_ae_title: {self.move_ae}, move_listen: '{HOST}:0'"
            if self.retrieve == "move"
            else ""
        )
        (self.tmp / "agent.yaml").write_text(
            "site: main\n"
            f"gateways: ['{HOST}:{self.ports['gateway']}']\n"
            "tls: {cert: pki/agent.crt, key: pki/agent.key, ca: pki/ca.crt}\n"
            "state_dir: state/\n"
            f"metrics_listen: {HOST}:0\n"
            f"pacs: {{ae_title: {self.pacs_ae}, host: {HOST}, port: {self.pacs_port}, "
            f"calling_ae_title: RELAY, retrieve: {self.retrieve}, "
            f"timeout: {self.pacs_timeout}{move}{self.pacs_extra}}}\n"
            "reconnect: {initial: 0.1s, max: 1s}\n"
            "drain_grace: 2s\n" + LIMITS + self.agent_extra
        )
        dests = ", ".join(f"{ae}: '{HOST}:{port}'" for ae, port in self.destinations.items())
        (self.tmp / "ws1.yaml").write_text(
            f"gateway: {HOST}:{self.ports['gateway']}\n"
            "identity_dir: ws1/\n"
            f"metrics_listen: {HOST}:0\n"
            "dicom:\n"
            f"  listen: {HOST}:0\n"
            f"  ae_title: {RELAY_AE}\n"
            f"  destinations: {{{dests}}}\n"
            + (f"  resume_window: {self.resume_window}\n" if self.resume_window else "")
            + "reconnect: {initial: 0.1s, max: 1s}\n"
            "drain_grace: 2s\n" + LIMITS + self.ws_extra
        )
        for role, command in (("gateway", "gateway"), ("agent", "agent"), ("ws1", "workstation")):
            argv = [*RELAY, command, "--config", str(self.tmp / f"{role}.yaml")]
            if self.ns is not None:
                argv = self.ns.exec_argv(argv)
            self.procs[role] = Proc(role, argv, self.tmp / f"{role}.log")
        return self

    def start(self, *roles: str) -> None:
        for role in roles or ("gateway", "agent", "ws1"):
            self.procs[role].start()

    def stop_all(self) -> None:
        for role in ("ws1", "agent", "gateway"):
            if role in self.procs:
                self.procs[role].stop()
        for sock in self.reserved.values():
            sock.close()

    def pid(self, role: str) -> int:
        return self.procs[role].pid

    def rss_kb(self, role: str) -> int:
        return rss_kb(self.pid(role))

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-4000:]}" for n, p in self.procs.items())

    @property
    def node(self) -> Any:
        """The workstation's local DICOM node, as the harness's DCMTK wrappers take it."""
        from tests.interop.harness import DicomNode

        return DicomNode(HOST, self.ports["dicom"], RELAY_AE, self.ns)

    # -- HTTP (metrics, readiness), from wherever the chain runs

    def _connect(self, port: int, timeout: float = 5.0) -> socket.socket:
        if self.ns is not None:
            sock: socket.socket = self.ns.create_connection(HOST, port, timeout=timeout)
            return sock
        return socket.create_connection((HOST, port), timeout=timeout)

    def http_get(self, port: int, path: str) -> tuple[int, str]:
        with self._connect(port) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body.decode(errors="replace")

    def metric(self, role: str, name: str, labels: str = "") -> float:
        """One sample of a role's /metrics (0 if absent), e.g. ("agent", "relay_bytes_total",
        'direction="sent",stage="raw"')."""
        _, body = self.http_get(self.ports[f"{role}_metrics"], "/metrics")
        want = f"{name}{{{labels}}} " if labels else f"{name} "
        for line in body.splitlines():
            if line.startswith(want):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def codec_counts(self) -> dict[str, int]:
        """Instances per transport codec the agent sent (its relay_pixel_codec_* metrics)."""
        _, body = self.http_get(self.ports["agent_metrics"], "/metrics")
        found = re.findall(r'^relay_pixel_codec_instances_total\{codec="(\w+)"\} (\S+)$',
                           body, re.MULTILINE)  # fmt: skip
        return {codec: int(float(n)) for codec, n in found}

    def ready(self) -> bool:
        for port in (self.ports["ws_metrics"], self.ports["agent_metrics"]):
            try:
                status, _ = self.http_get(port, "/readyz")
            except OSError:
                return False
            if status != 200:
                return False
        return True

    def wait_ready(self, within: float = WAIT) -> float:
        """Until both ends are ready and a C-ECHO passes the chain; the seconds it took."""
        from tests.interop.harness import dcmtk

        start = time.monotonic()
        deadline = start + within
        while True:
            for proc in self.procs.values():
                if proc.popen is not None and proc.popen.poll() is not None:
                    raise AssertionError(f"{proc.name} exited\n{self.logs()}")
            if self.ready() and dcmtk.echoscu(self.node, timeout=10, check=False).ok:
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(f"the chain never came up\n{self.logs()}")
            time.sleep(0.2)


class _Ports:
    """`chain.ports[name]`: `DicomChain.port(name)`."""

    def __init__(self, chain: DicomChain) -> None:
        self.chain = chain

    def __getitem__(self, name: str) -> int:
        return self.chain.port(name)


@contextlib.contextmanager
def running_dicom_chain(chain: DicomChain) -> Iterator[DicomChain]:
    """Set up, start, wait until a C-ECHO passes; stop every role afterwards, even on failure."""
    chain.setup()
    try:
        chain.start()
        chain.wait_ready()
        yield chain
    finally:
        chain.stop_all()


def counts_after(chain: DicomChain, before: dict[str, int], instances: int) -> dict[str, int]:
    """Instances per codec since `before`, once the agent has counted `instances` more (it
    counts as it encodes; a scrape may still come just before the last one)."""
    deadline = time.monotonic() + 10
    while True:
        now = chain.codec_counts()
        diff = {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
        if sum(diff.values()) >= instances or time.monotonic() > deadline:
            return diff
        time.sleep(0.05)


# -- into a namespace ------------------------------------------------------------------


class NsForwarder:
    """Listens on 127.0.0.1 here; each connection is spliced to 127.0.0.1:`port` in `ns`.

    Bound at construction (the port is known before the chain's configs are written);
    the target is set later with `target()`. Connections before that are closed.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self._target: tuple[Any, int] | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="ns-forwarder")
        self._thread.start()

    def target(self, ns: Any, port: int | None) -> None:
        self._target = None if port is None else (ns, port)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = self._target
            if target is None or self._closed:
                conn.close()
                continue
            try:
                upstream = target[0].create_connection(HOST, target[1], timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(5)


# -- reading what arrived --------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's dataset, after its file meta: what must equal the PACS's bytes."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def bytes_by_instance(files: Iterable[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of each Part 10 file a DCMTK tool wrote (+B), to
    compare byte for byte with the instances the PACS holds."""
    import pydicom

    out: dict[str, bytes] = {}
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in out, f"{uid} received twice"
        out[uid] = dataset_bytes(path)
    return out


def match_elements(ds: Any) -> list[tuple[int, str]]:
    """A C-FIND match as comparable data (findscu's file meta differs from file to file)."""
    return sorted((int(e.tag), str(e.value)) for e in ds)


SUBOPS = re.compile(r"Completed Suboperations\s*:\s*(\d+)")


def completed_so_far(output: str) -> int:
    found = SUBOPS.findall(output)
    return int(found[-1]) if found else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="test helper: the embedded PACS as a process")
    sub = p.add_subparsers(dest="command", required=True)
    pacs = sub.add_parser("pacs")
    pacs.add_argument("--port", type=int, default=0)
    pacs.add_argument("--ae-title", default=PACS_AE)
    pacs.add_argument("--data", choices=("demo", "none"), default="demo")
    pacs.add_argument("--synthetic-bytes", type=int, default=0)
    pacs.add_argument("--send-delay", type=float, default=0.0)
    pacs.add_argument("--port-file", required=True)
    pacs.add_argument("--events-file", required=True)
    args = p.parse_args(argv)
    return _serve_pacs(args)


__all__ = [
    "HOST",
    "PACS_AE",
    "RELAY_AE",
    "ROOT",
    "DicomChain",
    "NsForwarder",
    "PacsProcess",
    "completed_so_far",
    "dataset_bytes",
    "match_elements",
    "running_dicom_chain",
]

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
