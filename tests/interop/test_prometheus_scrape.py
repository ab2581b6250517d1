"""A real Prometheus server scrapes the three roles' metrics listeners on 127.0.0.1.

Prometheus (Debian package `prometheus`) runs as a plain process with a generated
config, its own storage directory and a free loopback port; the relay roles are real
processes from the CLI (tests/e2e/ops_chain.py). Prometheus must see all three targets
up, and its query API must return the link and byte counts that real traffic produced.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ops_chain import (
    HOST,
    SITE,
    Node,
    Ops,
    echo_once,
    http_get,
    serving,
    until_echo_works,
    wait_for,
)
from tests.ports import wait_logged_port

from .harness import require_tools

pytestmark = pytest.mark.interop
WAIT = 60.0  # Prometheus's start-up and first scrapes, on a loaded machine


def prometheus_config(targets: dict[str, int]) -> str:
    """One job per role, scraped every second."""
    jobs = "".join(
        f"  - job_name: relay-{role}\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['{HOST}:{port}']\n"
        for role, port in targets.items()
    )
    return "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n" + jobs


async def api(port: int, path: str, **params: str) -> dict[str, Any]:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = await http_get(port, f"/api/v1/{path}{query}")
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]  # type: ignore[no-any-return]


async def query(port: int, promql: str) -> list[tuple[dict[str, str], float]]:
    """An instant query's vector: (labels, value) per series."""
    data = await api(port, "query", query=promql)
    return [(r["metric"], float(r["value"][1])) for r in data["result"]]


async def test_prometheus_scrapes_all_three_roles(tmp_path: Path) -> None:
    require_tools("prometheus")
    async with serving() as services:
        ops = Ops(tmp_path, services)
        try:
            await scrape_with_prometheus(ops, tmp_path)
        finally:
            ops.stop_all()


async def scrape_with_prometheus(ops: Ops, tmp_path: Path) -> None:
    gw = ops.gateway()
    ops.start(gw)
    agent = ops.agent("agent", [gw.listen_port])
    ws = ops.workstation("ws", gw.listen_port)
    ops.start(agent, ws)
    await until_echo_works(ws, logs=ops.logs)

    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config(
            {
                "gateway": gw.metrics_port,
                "agent": agent.metrics_port,
                "workstation": ws.metrics_port,
            }
        )
    )
    prometheus = ops.add(
        Node(
            "prometheus",
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={HOST}:0",  # it logs the port it got
            ],
            tmp_path / "prometheus.log",
            cwd=tmp_path,
        )
    )
    prometheus.start()
    port = wait_logged_port(
        prometheus.log,
        r'msg="Listening on" address=\S+:(?P<port>\d+)',
        alive=lambda: prometheus.running,
    )

    async def all_up() -> bool:
        try:
            targets = (await api(port, "targets"))["activeTargets"]
        except (OSError, TimeoutError, ValueError, IndexError, AssertionError):
            return False  # not answering yet, or 503 until its storage is ready
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    await wait_for(
        "three targets up in Prometheus", all_up, within=WAIT, interval=0.5, logs=ops.logs
    )
    targets = (await api(port, "targets"))["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {
        "relay-gateway",
        "relay-agent",
        "relay-workstation",
    }
    assert all(t["scrapeUrl"].startswith(f"http://{HOST}:") for t in targets)

    payload = b"scraped by a real Prometheus " * 4000
    assert await asyncio.wait_for(echo_once(ws, "zecho", payload), WAIT) == payload

    async def links_seen() -> bool:
        series = await query(port, f'relay_links{{role="agent",site="{SITE}"}}')
        return [(s["job"], v) for s, v in series] == [("relay-gateway", 1.0)]

    await wait_for("relay_links{role=agent} in Prometheus", links_seen, within=WAIT, interval=0.5)

    async def bytes_seen() -> bool:
        series = await query(port, "relay_bytes_total")
        by_job: dict[str, float] = {}
        for labels, v in series:
            by_job[labels["job"]] = by_job.get(labels["job"], 0.0) + v
        sent = await query(
            port, 'relay_bytes_total{job="relay-agent",direction="sent",stage="raw"}'
        )
        return (
            by_job.get("relay-gateway", 0) > 0
            and by_job.get("relay-workstation", 0) >= len(payload)
            and bool(sent)
            and sent[0][1] >= len(payload)
        )

    await wait_for("relay_bytes_total after traffic", bytes_seen, within=WAIT, interval=0.5)

    prometheus.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(prometheus.wait_exit, 30)
    assert code == 0, prometheus.output()[-3000:]
