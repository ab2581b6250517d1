"""A real Prometheus server (Debian package `prometheus`) as a child process of a test.

It takes deploy/prometheus/prometheus.yml (job names, rule file) with the targets and
intervals a test gives, its own storage directory, and listens on 127.0.0.1 port 0: the
port it got is read from its log. Queries go to its HTTP API. Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tools import HarnessError, require_tools, tail

HOST = "127.0.0.1"
DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"
_LISTENING = re.compile(r'msg="Listening on" address=\S*:(\d+)')
MAX_RESPONSE = 16 << 20  # bytes of one API answer


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector: its labels and value."""

    labels: dict[str, str]
    value: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


def deploy_config(targets: Mapping[str, Sequence[str]], interval: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with these targets per job and every interval set
    to `interval` (the rule file stays; jobs not in `targets` are dropped)."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job.update(scrape_interval=interval, scrape_timeout=interval)
            job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
            jobs.append(job)
    missing = set(targets) - {job["job_name"] for job in jobs}
    if missing:
        raise HarnessError(f"no such job in prometheus.yml: {sorted(missing)}")
    config["scrape_configs"] = jobs
    return config


@dataclass
class Prometheus:
    """`prometheus` scraping `targets` (job -> ["host:port"]) every `interval`."""

    workdir: Path
    targets: Mapping[str, Sequence[str]]
    interval: str = "1s"
    port: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, within: float = 60.0) -> Prometheus:
        """Start it with the deploy config and rules; return once it reports its port."""
        require_tools("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = deploy_config(self.targets, self.interval)
        for rule_file in config.get("rule_files", []):
            shutil.copy(DEPLOY / rule_file, self.workdir / rule_file)
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        argv = [
            "prometheus",
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address={HOST}:0",
        ]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + within
        while not (found := _LISTENING.search(self.log.read_text(errors="replace"))):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"Prometheus did not start:\n{tail(self.log)}")
            time.sleep(0.05)
        self.port = int(found.group(1))
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (None if never started)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)
            raise HarnessError(f"Prometheus ignored SIGTERM:\n{tail(self.log)}") from None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the HTTP API

    def api(self, path: str, **params: str) -> Any:
        """`data` of GET /api/v1/`path`; HarnessError unless Prometheus says success."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = _http_get(self.port, f"/api/v1/{path}{query}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise HarnessError(f"/api/v1/{path}: HTTP {status}: {body[:500]!r}") from None
        if status != 200 or answer.get("status") != "success":
            raise HarnessError(f"/api/v1/{path}{query}: HTTP {status}: {answer}")
        return answer["data"]

    def query(self, promql: str) -> list[Sample]:
        """An instant query (now) that must return a vector."""
        data = self.api("query", query=promql)
        if data["resultType"] != "vector":
            raise HarnessError(f"{promql}: a {data['resultType']}, not a vector")
        return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]

    def targets_up(self) -> bool:
        """Every configured target has been scraped successfully."""
        try:
            active = self.api("targets")["activeTargets"]
        except (OSError, HarnessError):
            return False  # not answering yet
        want = sum(len(t) for t in self.targets.values())
        return len(active) == want and all(t["health"] == "up" for t in active)

    def wait_scrapes(self, count: int, within: float = 60.0) -> None:
        """Wait until every target has been scraped `count` more times.

        A scrape under way now may miss what the test just did; with 3, two scrapes that
        started afterwards have stored it: every series it created or moved has two
        samples since, as rate() and increase() need. The last scrape of each target must
        have succeeded too (a failed one marks its series stale: instant queries miss them).
        """

        def scrapes() -> dict[str, float]:
            return {s.labels["instance"]: s.value for s in self.query("count_over_time(up[1d])")}

        def done() -> bool:
            now = scrapes()
            return all(now.get(i, 0) >= n + count for i, n in before.items()) and self.targets_up()

        before = scrapes()
        self.wait_until(f"{count} more scrapes of every target", done, within)

    def wait_until(self, what: str, check: Callable[[], bool], within: float = 60.0) -> None:
        """Poll `check` (about twice a scrape interval) until true; HarnessError after `within`."""
        deadline = time.monotonic() + within
        while not check():
            if self.popen is not None and self.popen.poll() is not None:
                raise HarnessError(f"Prometheus exited:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out waiting for {what}\n{tail(self.log)}")
            time.sleep(0.5)


def _http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a plain HTTP/1.0 GET on 127.0.0.1:`port`."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        chunks, size = [], 0
        while data := sock.recv(1 << 16):
            chunks.append(data)
            size += len(data)
            if size > MAX_RESPONSE:
                raise HarnessError(f"{path}: answer larger than {MAX_RESPONSE} bytes")
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
