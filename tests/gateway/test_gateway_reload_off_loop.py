"""A real gateway process reloads off its event loop (gateway.lifecycle, relay.ops.reloader):
while a SIGHUP's reload waits on a config that is a FIFO nobody has written yet, the
gateway still serves (its /metrics here; its links the same way); a burst of SIGHUPs
makes at most one more reload, and SIGTERM stops it without waiting for the FIFO.

On the old code the reload read the FIFO on the loop: /metrics answered only after the
FIFO's deadline, with the reload already counted as failed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.trust import pki
from tests.ports import HOST, wait_listening
from tests.reload_helpers import HAS_FIFO, feed, held_reader, make_fifo

RELAY = [sys.executable, "-m", "relay.cli"]
ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0

pytestmark = pytest.mark.skipif(not HAS_FIFO, reason="SIGHUP and FIFOs are POSIX")


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    config: Path
    text: str  # a valid config
    log: Path
    metrics_port: int

    def reloads(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as answer:
            text = answer.read().decode()
        return {
            sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "relay_reloads_total"
        }

    def messages(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line).get("msg", "") for line in lines if line.startswith("{")]


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextlib.contextmanager
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    pki.init_pki(tmp_path / "pki", "hospital.test", "main", ["localhost", HOST])
    config = tmp_path / "gateway.yaml"
    text = (
        f"listen: {HOST}:0\nmetrics_listen: {HOST}:0\n"
        "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
        "drain_grace: 1s\nlog_level: info\n"
    )
    config.write_text(text)
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*RELAY, "gateway", "--config", str(config)], stdout=out, stderr=out, cwd=ROOT
        )
    try:
        port = wait_listening(log, "metrics", alive=lambda: proc.poll() is None).port
        yield Gateway(proc, config, text, log, port)
    finally:
        proc.kill()
        proc.wait(15)


def test_the_gateway_serves_while_a_reload_waits_for_its_config(tmp_path: Path) -> None:
    with gateway(tmp_path) as gw:
        make_fifo(gw.config)
        gw.proc.send_signal(signal.SIGHUP)
        writer = held_reader(gw.config)  # the reload is reading: held until we write
        assert gw.reloads() == {"ok": 0.0, "error": 0.0}  # answered meanwhile
        feed(writer, gw.text.replace("drain_grace: 1s", "drain_grace: 2s"))
        until(lambda: gw.reloads()["ok"] == 1.0, "the reload applied")
        assert gw.reloads()["error"] == 0.0


def test_a_burst_of_sighups_makes_at_most_two_reloads(tmp_path: Path) -> None:
    with gateway(tmp_path) as gw:
        make_fifo(gw.config)
        gw.proc.send_signal(signal.SIGHUP)
        writer = held_reader(gw.config)
        for _ in range(20):
            gw.proc.send_signal(signal.SIGHUP)
        assert gw.reloads() == {"ok": 0.0, "error": 0.0}  # after the signals: they are in
        feed(writer, gw.text)
        until(lambda: gw.reloads()["ok"] == 1.0, "the first reload applied")  # its FIFO closed
        feed(held_reader(gw.config), gw.text)  # the one more, reading the file anew
        until(lambda: gw.reloads()["ok"] == 2.0, "both reloads applied")
        # A third would have begun (and said so) before the second's count was served.
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(WAIT) == 0
        messages = gw.messages()
        assert messages.count("reloading configuration and certificates") == 2
        assert messages.count("reloaded configuration and certificates") == 2


def test_sigterm_during_a_held_reload_stops_the_gateway(tmp_path: Path) -> None:
    with gateway(tmp_path) as gw:
        make_fifo(gw.config)
        gw.proc.send_signal(signal.SIGHUP)
        writer = held_reader(gw.config)
        try:
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(WAIT) == 0  # while the FIFO still has no data
        finally:
            os.close(writer)
        messages = gw.messages()
        assert "gateway stopped" in messages
        # Not after the reload gave up on the FIFO, as it did on the loop: neither applied
        # nor failed, abandoned.
        assert not [m for m in messages if m.startswith(("reload failed", "reloaded"))]
