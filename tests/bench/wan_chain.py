"""The WAN benchmark's processes and its one measurement: a timed DCMTK `getscu`.

Hospital side (started once): the PACS (tests/bench/wan_pacs.py), `relay gateway` and
`relay agent`, all on 127.0.0.1 with no emulated delay. Per link profile: a delay/rate
proxy in front of the gateway, one in front of the PACS, and `relay workstation` whose
`gateway:` is the first proxy. Every child gets TCP_NODELAY=1 in its environment.

`retrieve()` runs getscu once and timestamps its `-v` log as the lines arrive: an
instance counts as received when getscu logs "Sending C-STORE Response", which it does
after the dataset is complete and written to the output directory.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.bench.procs import (
    HOST,
    VENV_BIN,
    BenchError,
    Process,
    ProcessGroup,
    scrape,
    system_busy_seconds,
)
from tests.bench.targets import SITE, BenchPki, Gateway, start_gateway
from tests.bench.wan_net import Profile, start_proxy
from tests.interop.harness.tools import tool_path

ENV: Final = {"TCP_NODELAY": "1"}
PACS_AE: Final = "RELAYPACS"
NODE_AE: Final = "RELAY"
VIEWER_AE: Final = "BENCHVIEW"
START_TIMEOUT: Final = 30.0
PACS_START_TIMEOUT: Final = 120.0  # generating the study takes seconds on a busy machine
COMPRESSED: Final = 'relay_bytes_total{direction="sent",stage="compressed"}'
RAW: Final = 'relay_bytes_total{direction="sent",stage="raw"}'
SPARE_USED: Final = 'relay_pacs_spare_associations_total{outcome="used"}'
_STORED: Final = "Sending C-STORE Response"
_SUBOPS: Final = re.compile(r"Number of (\w+) Suboperations\s*:\s*(\d+)")


@dataclass(frozen=True)
class Knobs:
    """Config that the benchmark may vary: `limits` (a YAML flow mapping for the limits:
    section of all three relay processes), the agent's zstd level and its pixel codecs
    (`pacs.pixel_codecs`: auto, off, jpegls, htj2k; issue 14), the PACS's study
    (`tests.bench.wan_pacs.STUDIES`: the phantom, or one real CT slice in every instance)
    and `pacs.spare_association` (a duration; empty: the default)."""

    limits: str = ""
    compression_level: int = 3
    pixel_codecs: str = "auto"
    study: str = "phantom"
    spare_association: str = ""

    def describe(self) -> str:
        parts = [f"limits {self.limits}" if self.limits else "default limits"]
        parts.append(f"compression_level {self.compression_level}")
        parts.append(f"pixel_codecs {self.pixel_codecs}")
        if self.study != "phantom":
            parts.append(f"study {self.study}")
        if self.spare_association:
            parts.append(f"spare_association {self.spare_association}")
        return ", ".join(parts)


@dataclass
class Hospital:
    """PACS, gateway and agent: the processes that stay up for the whole benchmark."""

    pacs: Process
    pacs_port: int
    gateway: Gateway
    agent: Process
    agent_metrics: int

    @property
    def procs(self) -> list[Process]:
        return [self.pacs, self.gateway.proc, self.agent]


def _limits_line(knobs: Knobs) -> str:
    return f"limits: {knobs.limits}\n" if knobs.limits else ""


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _wait_ready(proc: Process, metrics_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _get_ok(f"http://{HOST}:{metrics_port}/readyz"):
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} not ready after {timeout:g}s: {proc.log_tail()}")
        time.sleep(0.1)


def start_hospital(
    group: ProcessGroup,
    bench_pki: BenchPki,
    workdir: Path,
    count: int,
    knobs: Knobs,
    *,
    pacs_args: tuple[str, ...] = (),
) -> Hospital:
    pacs = group.process(
        "pacs",
        [sys.executable, "-m", "tests.bench.wan_pacs", "--port", "0",
         "--count", str(count), "--ae-title", PACS_AE, "--seconds", "3600",
         "--study", knobs.study, *pacs_args],
        env=ENV,
    )  # fmt: skip
    gateway = start_gateway(group, bench_pki, workdir, env=ENV, extra_config=_limits_line(knobs))
    pacs_port = pacs.logged_port(r"wan_pacs \S+ on [\d.]+:(?P<port>\d+):", PACS_START_TIMEOUT)
    cert, key = bench_pki.pair("agent")
    config = workdir / "agent.yaml"
    config.write_text(
        f"site: {SITE}\n"
        f"gateways: ['{HOST}:{gateway.port}']\n"
        f"tls: {{cert: {cert}, key: {key}, ca: {bench_pki.ca}}}\n"
        f"state_dir: {workdir / 'agent-state'}\n"
        f"metrics_listen: {HOST}:0\n"
        f"pacs: {{ae_title: {PACS_AE}, host: {HOST}, port: {pacs_port}, "
        f"calling_ae_title: {NODE_AE}, pixel_codecs: '{knobs.pixel_codecs}'"
        + (f", spare_association: {knobs.spare_association}" if knobs.spare_association else "")
        + "}\n"
        f"compression_level: {knobs.compression_level}\n"
        "reconnect: {initial: 0.1s, max: 1s}\n"
        "drain_grace: 1s\n"
        # The load benchmark's links all present the one bench device certificate: lift
        # the per-device stream bucket a real fleet (a certificate per device) has.
        "per_device: {stream_burst: 1000000, stream_rate: 1000000}\n"
        "log_level: warning\n" + _limits_line(knobs)
    )
    agent = group.process("agent", [str(VENV_BIN / "relay"), "agent", "--config", str(config)],
                          env=ENV)  # fmt: skip
    agent_metrics = agent.listening("metrics", START_TIMEOUT)
    _wait_ready(agent, agent_metrics, START_TIMEOUT)
    return Hospital(pacs, pacs_port, gateway, agent, agent_metrics)


@dataclass
class Site:
    """One profile's WAN side: the workstation and the two proxies (one in front of the
    gateway, for the workstation; one in front of the PACS, for direct getscu). Without
    emulation there are no proxies and both connect straight to the hospital."""

    profile: Profile
    workstation: Process
    node_port: int  # the workstation's DICOM node
    direct_port: int  # the PACS, or the proxy in front of it
    proxies: list[Process] = field(default_factory=list)

    @property
    def procs(self) -> list[Process]:
        return [*self.proxies, self.workstation]


def start_site(
    group: ProcessGroup,
    bench_pki: BenchPki,
    workdir: Path,
    *,
    hospital: Hospital,
    profile: Profile,
    knobs: Knobs,
    extra_config: str = "",
) -> Site:
    proxies: list[Process] = []
    gateway_port, direct_port = hospital.gateway.port, hospital.pacs_port
    if profile.emulated:
        gw_proxy, gateway_port = start_proxy(
            group, f"proxy-gateway-{profile.name}", hospital.gateway.port, profile, ENV
        )
        pacs_proxy, direct_port = start_proxy(
            group, f"proxy-pacs-{profile.name}", hospital.pacs_port, profile, ENV
        )
        proxies = [gw_proxy, pacs_proxy]
    config = workdir / f"workstation-{profile.name}.yaml"
    config.write_text(
        f"gateway: {HOST}:{gateway_port}\n"
        f"identity_dir: {bench_pki.directory / 'device'}\n"
        f"metrics_listen: {HOST}:0\n"
        f"dicom: {{listen: '{HOST}:0', ae_title: {NODE_AE}}}\n"
        "reconnect: {initial: 0.1s, max: 1s}\n"
        "drain_grace: 1s\n"
        "log_level: warning\n" + _limits_line(knobs) + extra_config
    )
    ws = group.process(
        f"workstation-{profile.name}",
        [str(VENV_BIN / "relay"), "workstation", "--config", str(config)],
        env=ENV,
    )
    node_port = ws.listening("dicom", START_TIMEOUT)
    _wait_ready(ws, ws.listening("metrics", START_TIMEOUT), START_TIMEOUT)
    # The agent link must be routed and the PACS up: C-ECHO both ways until both answer.
    for port, ae in ((node_port, NODE_AE), (direct_port, PACS_AE)):
        echo_until_ok(port, ae, START_TIMEOUT)
    return Site(profile, ws, node_port, direct_port, proxies)


def echo_until_ok(port: int, ae: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["echoscu", "-aet", VIEWER_AE, "-aec", ae, HOST, str(port)],
            env=_tool_env(), capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"echoscu to {ae} at port {port} keeps failing: {done.stderr[-500:]}")
        time.sleep(0.3)


def _tool_env() -> dict[str, str]:
    return {**os.environ, "PATH": tool_path(), **ENV}  # DCMTK's tools, not pynetdicom's


def image_find_seconds(port: int, study_uid: str, tries: int = 3) -> float:
    """Best time of a findscu at IMAGE level over the study, against HOST:port (the PACS):
    the last and largest query of the agent's survey before a C-GET."""
    best = float("inf")
    for _ in range(tries):
        started = time.monotonic()
        done = subprocess.run(
            ["findscu", "-S", "-aet", VIEWER_AE, "-aec", PACS_AE,
             "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid}",
             "-k", "SeriesInstanceUID=", "-k", "SOPInstanceUID=", "-k", "SOPClassUID=",
             HOST, str(port)],
            env=_tool_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"findscu against the PACS failed: {done.stderr[-500:]}")
        best = min(best, time.monotonic() - started)
    return best


@dataclass(frozen=True)
class Tally:
    """What the agent sent in one transport codec during a retrieval."""

    instances: int
    raw: float
    wire: float


_CODEC_SAMPLE: Final = re.compile(
    r'relay_pixel_codec_(instances|raw_bytes|wire_bytes)_total\{codec="(\w+)"\}'
)


def codec_tallies(before: dict[str, float], after: dict[str, float]) -> dict[str, Tally]:
    """The agent's `relay_pixel_codec_*` counters over a retrieval, by codec."""
    got: dict[str, dict[str, float]] = {}
    for key, value in after.items():
        if m := _CODEC_SAMPLE.fullmatch(key):
            got.setdefault(m[2], {})[m[1]] = value - before.get(key, 0.0)
    return {
        codec: Tally(int(v.get("instances", 0)), v.get("raw_bytes", 0.0), v.get("wire_bytes", 0.0))
        for codec, v in sorted(got.items())
        if v.get("instances", 0) > 0
    }


@dataclass
class Retrieval:
    """One getscu run: when instances completed (seconds after the launch), and costs."""

    case: str  # "relay" or "direct"
    stored: list[float]
    completed: int
    failed: int
    files: int
    file_bytes: int
    seconds: float  # launch to exit
    compressed: float = 0.0  # agent's compressed bytes sent during the run (relay)
    raw: float = 0.0  # ... and their uncompressed size
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process name
    codecs: dict[str, Tally] = field(default_factory=dict)  # agent's, by transport codec
    other_load: float = 0.0  # cores used by processes outside the benchmark
    spare: bool = False  # the agent's C-GET took the association left by the last request

    @property
    def first(self) -> float:
        return self.stored[0]

    @property
    def last(self) -> float:
        return self.stored[-1]


def retrieve(
    case: str,
    port: int,
    ae: str,
    study_uid: str,
    *,
    out_dir: Path,
    ours: list[Process],
    agent_metrics: int | None,
    timeout: float,
) -> Retrieval:
    """getscu the study from HOST:port (AE `ae`) into `out_dir` (emptied afterwards)."""
    if shutil.which("getscu", path=tool_path()) is None:
        raise BenchError("getscu is not installed (Debian package dcmtk)")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    argv = [
        "getscu", "-v", "-S", "-aet", VIEWER_AE, "-aec", ae, "-od", str(out_dir),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
        HOST, str(port),
    ]  # fmt: skip
    before = scrape(agent_metrics) if agent_metrics else {}
    cpu0 = {p.name: p.cpu() for p in ours}
    busy0 = system_busy_seconds()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=_tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    stored: list[float] = []
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            now = time.monotonic() - started
            line = raw.decode(errors="replace")
            if _STORED in line:
                stored.append(now)
            tail = [*tail[-40:], line]
        proc.wait()
    finally:
        killer.cancel()
    seconds = time.monotonic() - started
    busy = system_busy_seconds() - busy0
    cpu = {p.name: p.cpu() - cpu0[p.name] for p in ours}
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu["getscu"] = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    cpu["bench"] = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    after = scrape(agent_metrics) if agent_metrics else {}
    text = "".join(tail)
    subops = {name: int(n) for name, n in _SUBOPS.findall(text)}
    files = [p for p in out_dir.iterdir() if p.is_file()]
    result = Retrieval(
        case=case,
        stored=stored,
        completed=subops.get("Completed", 0),
        failed=subops.get("Failed", 0),
        files=len(files),
        file_bytes=sum(p.stat().st_size for p in files),
        seconds=seconds,
        compressed=after.get(COMPRESSED, 0.0) - before.get(COMPRESSED, 0.0),
        raw=after.get(RAW, 0.0) - before.get(RAW, 0.0),
        cpu=cpu,
        codecs=codec_tallies(before, after),
        other_load=max(0.0, busy - sum(cpu.values())) / seconds,
        spare=after.get(SPARE_USED, 0.0) > before.get(SPARE_USED, 0.0),
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0 or not stored or result.failed:
        raise BenchError(
            f"{case} getscu failed (exit {proc.returncode}, {len(stored)} stored, "
            f"{result.failed} failed):\n{text[-3000:]}"
        )
    return result
