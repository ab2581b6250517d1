"""Child processes of a benchmark: start, talk to, measure (/proc) and always clean up.

Every child dies with the benchmark (PR_SET_PDEATHSIG), inherits its raised RLIMIT_NOFILE,
and is stopped by `ProcessGroup.close()` (SIGTERM, then SIGKILL after a grace period).
Workers speak JSON lines: events on stdout, one-line commands on stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from tests.ports import reserve, wait_listening, wait_logged_port

REPO: Final = Path(__file__).resolve().parents[2]
VENV_BIN: Final = Path(sys.executable).parent
HOST: Final = "127.0.0.1"
#: File descriptors a benchmark process may hold (the hard limit caps it).
NOFILE_WANTED: Final = 65536
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class BenchError(Exception):
    """A benchmark could not run (a process failed or a wait timed out); names which."""


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE as far as allowed; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _die_with_parent(argv: Sequence[str]) -> list[str]:
    """Prefix `argv` so the child gets SIGKILL when the benchmark dies (PR_SET_PDEATHSIG).

    setpriv (util-linux) does it before exec; preexec_fn would not be safe here, since
    the benchmark process runs reader threads.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else list(argv)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all cores spent in processes (or stolen by the hypervisor) since boot.

    From /proc/stat; interrupts and softirqs are left out, since loopback traffic of the
    benchmark itself is processed there.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / _CLK_TCK


def other_load(ours: Sequence[Process], seconds: float = 1.0) -> float:
    """Cores kept busy by everything except `ours` over the next `seconds`."""
    busy, mine = system_busy_seconds(), sum(p.cpu() for p in ours)
    time.sleep(seconds)
    return max(0.0, system_busy_seconds() - busy - (sum(p.cpu() for p in ours) - mine)) / seconds


QUIET_LIMIT: Final = 0.3  # cores of other load under which a measurement counts as clean


def quietest(measure: Callable[[], T], load: Callable[[T], float], tries: int) -> T:
    """Run `measure` until its window had under QUIET_LIMIT cores of other load, at most
    `tries` times; return the sample with the least other load."""
    best: T | None = None
    for _ in range(max(1, tries)):
        if best is not None:
            print(f"  (other load {load(best):.2f} cores: measuring again)", flush=True)
        sample = measure()
        if best is None or load(sample) < load(best):
            best = sample
        if load(best) < QUIET_LIMIT:
            break
    assert best is not None
    return best


def wait_for_quiet(limit: float = QUIET_LIMIT, patience: float = 60.0) -> float:
    """Wait (up to `patience` s) until other processes use under `limit` cores; returns it."""
    deadline = time.monotonic() + patience
    while True:
        load = other_load([], 1.0)
        if load < limit or time.monotonic() > deadline:
            return load
        time.sleep(1.0)


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def wait_port(port: int, timeout: float, proc: Process | None = None) -> None:
    """Until something accepts TCP on HOST:port (or `proc` exits, or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {HOST}:{port} after {timeout}s")


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """Prometheus samples from http://HOST:port/metrics, keyed by `name{labels}` text."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as resp:
        return samples_of(resp.read(8 << 20).decode())


def samples_of(body: str) -> dict[str, float]:
    """Prometheus text exposition as samples keyed by `name{labels}` text."""
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


class Process:
    """A child process whose output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        pipes: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = str(REPO)
        child_env.update(env or {})
        self.popen = subprocess.Popen(
            _die_with_parent(argv),
            cwd=REPO,
            env=child_env,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def listening(self, what: str, timeout: float) -> int:
        """The port of listener `what` that this relay role reported in its log."""
        alive = lambda: self.popen.poll() is None  # noqa: E731
        try:
            return wait_listening(self.log_path, what, alive=alive, within=timeout).port
        except AssertionError as exc:
            raise BenchError(f"{self.name}: {exc}") from None

    def logged_port(self, pattern: str, timeout: float) -> int:
        """The port in the first line of this process's log that matches `pattern`."""
        alive = lambda: self.popen.poll() is None  # noqa: E731
        try:
            return wait_logged_port(self.log_path, pattern, alive=alive, within=timeout)
        except AssertionError as exc:
            raise BenchError(f"{self.name}: {exc}") from None

    def log_tail(self, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


class Worker(Process):
    """A `python -m tests.bench.workers ROLE` child: JSON events out, commands in."""

    def __init__(self, name: str, role: str, args: dict[str, Any], log_dir: Path) -> None:
        argv = [sys.executable, "-m", "tests.bench.workers", role, json.dumps(args)]
        super().__init__(name, argv, log_dir, pipes=True)
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10000)
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if isinstance(event, dict):
                    self._events.put(event, timeout=10)
        self._events.put(None, timeout=10)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event named `event` (others are skipped); BenchError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {event!r} within {timeout}s: {self.log_tail()}")
            try:
                got = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if got is None:
                self.popen.wait(5)
                raise BenchError(
                    f"{self.name} exited ({self.popen.returncode}) before {event!r}: "
                    f"{self.log_tail()}"
                )
            if got.get("event") == "error":
                raise BenchError(f"{self.name}: {got.get('message')}")
            if got.get("event") == event:
                return got

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(command.encode() + b"\n")
            self.popen.stdin.flush()
        except OSError as exc:
            raise BenchError(f"{self.name}: cannot send {command!r}: {exc}") from None

    def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send `command` and return the worker's reply event of the same name."""
        self.send(command)
        return self.expect(command, timeout)


class ProcessGroup:
    """Owns the processes of one benchmark run; closing stops them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Process] = []
        self._reserved: list[socket.socket] = []

    def reserve(self) -> int:
        """A port kept for this run (tests.ports.reserve): for programs that cannot
        take port 0 and say which port they got."""
        sock = reserve()
        self._reserved.append(sock)
        return int(sock.getsockname()[1])

    def process(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        proc = Process(name, argv, self.log_dir, env=env)
        self._procs.append(proc)
        return proc

    def worker(self, name: str, role: str, **args: Any) -> Worker:
        worker = Worker(name, role, args, self.log_dir)
        self._procs.append(worker)
        return worker

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
