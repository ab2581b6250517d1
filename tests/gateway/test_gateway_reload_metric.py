"""A real gateway process exports `relay_reloads_total{result}` from 0 for both results,
so the first failed SIGHUP is an increase that RelayReloadFailed sees."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.trust import pki
from tests.ports import HOST, wait_listening

RELAY = [sys.executable, "-m", "relay.cli"]
ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP reload is POSIX")


def reloads(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "relay_reloads_total"
    }


def test_a_fresh_gateway_exports_both_reload_results_at_zero(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "pki", "hospital.test", "main", ["localhost", HOST])
    config = tmp_path / "gateway.yaml"
    good = (
        f"listen: {HOST}:0\nmetrics_listen: {HOST}:0\n"
        "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
        "drain_grace: 1s\nlog_level: warning\n"
    )
    config.write_text(good)
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*RELAY, "gateway", "--config", str(config)], stdout=out, stderr=out, cwd=ROOT
        )
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        port = wait_listening(log, "metrics", alive=alive).port
        assert reloads(port) == {"ok": 0.0, "error": 0.0}
        config.write_text(good + "no_such_key: 1\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while reloads(port)["error"] == 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloads(port) == {"ok": 0.0, "error": 1.0}
    finally:
        proc.kill()
        proc.wait(15)
