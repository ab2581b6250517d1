"""Every query the operators are given works against a real scrape of the three roles.

A real Prometheus, with deploy/prometheus/prometheus.yml (its job names) and alerts.yml,
scrapes `relay gateway|agent|workstation` of a DICOM chain (tests/e2e/dicom_chain.py:
real processes, real TLS on 127.0.0.1, the embedded PACS in its own process) that has done
two rounds of work with DCMTK: C-ECHO, C-FIND, C-GET and a refused C-MOVE, plus a refused
connection and a failed then a good SIGHUP reload on the gateway. Then:

- every panel query of deploy/grafana/relay-dashboard.json, with Grafana's variables
  substituted, returns series, carries the labels it groups by and its legend shows, and
  has a finite value; so does each vector selector in it;
- every vector selector in every alert rule selects series, the labels each rule groups
  by are on them, and Prometheus evaluates every rule without an error;
- the metric list in deploy/README.md names labels that the series really carry.

A query naming a metric or label that does not exist is valid PromQL that returns
nothing (or series without that label): that is what these checks catch.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.dicom_chain import HOST, DicomChain, PacsProcess, running_dicom_chain

from .harness import dcmtk, require_tools
from .harness.prometheus import Prometheus, Sample
from .harness.promql import (
    grouping_labels,
    legend_labels,
    metric_name,
    substitute,
    vector_selectors,
)

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SITE = "main"  # DicomChain's site
TIMEOUT = 60.0  # one DCMTK run; Prometheus catching up
#: Grafana's variables. The rate window spans the whole test, as a dashboard showing the
#: last 10 minutes at a coarse resolution would: the counters moved within it.
VARIABLES = {"__rate_interval": "10m", "site": SITE}
#: Labels Prometheus adds to every series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance"}
#: DicomChain's name of each role's metrics port ("<name>_metrics") -> the job scraping it.
JOBS = {"gateway": "relay-gateway", "agent": "relay-agent", "ws": "relay-workstation"}


@dataclass
class Scraped:
    prometheus: Prometheus
    chain: DicomChain


# --------------------------------------------------------------------------- the work


def smallest_study(chain: DicomChain) -> str:
    found = dcmtk.findscu(
        chain.node, "STUDY", {"NumberOfStudyRelatedInstances": ""}, timeout=TIMEOUT
    )
    uids = found.values("StudyInstanceUID")
    counts = [int(n or 0) for n in found.values("NumberOfStudyRelatedInstances")]
    assert uids, found.output
    return min(zip(counts, uids, strict=True))[1] if len(counts) == len(uids) else uids[0]


def dicom_round(chain: DicomChain, study: str, out: Path) -> None:
    """One of each operation through the workstation, and a C-MOVE the node refuses."""
    assert dcmtk.echoscu(chain.node, timeout=TIMEOUT).ok
    assert dcmtk.findscu(chain.node, "STUDY", {"PatientID": ""}, timeout=TIMEOUT).matches
    got = dcmtk.getscu(chain.node, out, "STUDY", {"StudyInstanceUID": study}, timeout=TIMEOUT)
    assert got.status == "Success" and got.files, got.output
    moved = dcmtk.movescu(
        chain.node, "NOSUCHAE", "STUDY", {"StudyInstanceUID": study}, timeout=TIMEOUT,
        check=False,
    )  # fmt: skip
    assert not moved.ok, moved.output  # a failed operation, for the failure ratio


def refused_connection(chain: DicomChain) -> None:
    """A client that does not speak TLS: a failed handshake, a refusal."""
    with socket.create_connection((HOST, chain.ports["gateway"]), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while sock.recv(4096):  # until the gateway closes it
            pass


def wait_for(what: str, check: Callable[[], bool], logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{logs()}")
        time.sleep(0.1)


def reload_gateway(chain: DicomChain, config_text: str, result: str) -> None:
    """SIGHUP the gateway with this config; wait until it counts a reload of `result`."""
    labels = f'result="{result}"'
    before = chain.metric("gateway", "relay_reloads_total", labels)
    (chain.tmp / "gateway.yaml").write_text(config_text)
    chain.procs["gateway"].send_signal(signal.SIGHUP)
    wait_for(
        f"a reload counted as {result}",
        lambda: chain.metric("gateway", "relay_reloads_total", labels) > before,
        chain.logs,
    )


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    require_tools("prometheus", "echoscu", "findscu", "getscu", "movescu")
    tmp = tmp_path_factory.mktemp("scraped")
    pacs = PacsProcess(tmp / "pacs").start()
    try:
        chain = DicomChain(tmp / "chain", pacs.port)
        with running_dicom_chain(chain):
            targets = {
                job: [f"{HOST}:{chain.ports[f'{name}_metrics']}"] for name, job in JOBS.items()
            }
            with Prometheus(tmp / "prometheus", targets) as prometheus:
                prometheus.wait_until("every target up", prometheus.targets_up, TIMEOUT)
                study = smallest_study(chain)
                dicom_round(chain, study, tmp / "get1")
                refused_connection(chain)
                prometheus.wait_scrapes(3)
                good = (chain.tmp / "gateway.yaml").read_text()
                reload_gateway(chain, good + "listen_typo: 1\n", "error")
                reload_gateway(chain, good, "ok")
                dicom_round(chain, study, tmp / "get2")
                refused_connection(chain)
                prometheus.wait_scrapes(3)
                yield Scraped(prometheus, chain)
    finally:
        pacs.stop()


# --------------------------------------------------------------------------- checks


def query_problems(prometheus: Prometheus, where: str, expr: str, legend: str = "") -> list[str]:
    """What is wrong with `expr` against this scrape (nothing: an empty list).

    It must return series with a finite value; every series must carry the labels the
    expression groups by and the legend shows; each vector selector must select series.
    """
    problems = [
        f"{where}: {selector} selects nothing"
        for selector in vector_selectors(expr)
        if not prometheus.query(selector)
    ]
    samples = prometheus.query(expr)
    if not samples:
        return [*problems, f"{where}: no data from {expr}"]
    wanted = (grouping_labels(expr) | legend_labels(legend)) - {"le"}
    for sample in samples:
        if missing := wanted - sample.labels.keys():
            problems.append(f"{where}: {sample.labels} lacks {sorted(missing)} ({expr})")
    if not any(s.finite for s in samples):
        problems.append(f"{where}: only {[s.value for s in samples]} from {expr}")
    return problems


def panel_targets() -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) of every panel query, Grafana's variables substituted."""
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "relay-dashboard.json").read_text())
    panels = list(data["panels"])
    for panel in panels:
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], VARIABLES)
            assert "$" not in expr, expr
            yield f"panel {panel['title']!r} {target['refId']}", expr, target["legendFormat"]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_every_dashboard_panel_returns_data(scraped: Scraped) -> None:
    targets = list(panel_targets())
    assert len(targets) >= 20  # every panel is read (rows hold none)
    problems = [p for t in targets for p in query_problems(scraped.prometheus, *t)]
    assert not problems, "\n".join(problems)


def test_dashboard_site_variable_lists_the_site(scraped: Scraped) -> None:
    data = json.loads((DEPLOY / "grafana" / "relay-dashboard.json").read_text())
    [site] = [v for v in data["templating"]["list"] if v["name"] == "site"]
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", site["query"]["query"])
    assert match, site["query"]
    values = scraped.prometheus.api(f"label/{match[2]}/values", **{"match[]": match[1]})
    assert values == [SITE]


def test_the_checks_catch_a_label_or_metric_that_does_not_exist(scraped: Scraped) -> None:
    """The query checks can fail: the panel as it was (a `direction` label that
    relay_dicom_instances_total never had), and a misspelt metric."""
    old_panel = "sum by (direction) (rate(relay_dicom_instances_total[10m]))"
    assert scraped.prometheus.query(old_panel)  # it returns data, so "no data" is not enough
    assert query_problems(scraped.prometheus, "old", old_panel, "{{direction}}")
    misspelt = 'sum by (site) (relay_link{job="relay-gateway"})'
    assert query_problems(scraped.prometheus, "misspelt", misspelt, "{{site}}")


def test_alert_rules_select_real_series(scraped: Scraped) -> None:
    """Each selector in a rule selects series (a typo would keep the alert silent), and
    each label a rule groups by is on the series of one of its selectors."""
    problems = []
    for rule in alert_rules():
        name, expr = rule["alert"], rule["expr"]
        selected = {}
        for selector in vector_selectors(expr):
            selected[selector] = scraped.prometheus.query(selector)
            if not selected[selector]:
                problems.append(f"{name}: {selector} selects nothing")
        for label in grouping_labels(expr) - TARGET_LABELS:
            if not any(_all_carry(series, label) for series in selected.values()):
                problems.append(f"{name}: no selector's series carry {label!r}")
    assert not problems, "\n".join(problems)


def _all_carry(series: list[Sample], label: str) -> bool:
    return bool(series) and all(label in s.labels for s in series)


def test_alert_rules_evaluate_without_error(scraped: Scraped) -> None:
    """Prometheus loaded alerts.yml with the deploy config and evaluates every rule."""

    def rules() -> list[dict[str, Any]]:
        groups = scraped.prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    scraped.prometheus.wait_until(
        "every rule evaluated", lambda: all(r["health"] != "unknown" for r in rules())
    )
    loaded = rules()
    assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []


README_METRICS = re.compile(r"`(relay_\w+)(?:\{([^}]*)\})?`")


def test_deploy_readme_metric_labels_exist(scraped: Scraped) -> None:
    """The README's list: `name{label,label="value"}` is a series with those labels."""
    text = (DEPLOY / "README.md").read_text()
    listed = text[text.index("Metric names used here") : text.index("DICOM statuses")]
    entries = README_METRICS.findall(listed)
    assert len(entries) >= 15, entries
    problems = []
    for name, spec in entries:
        matchers = [item.strip() for item in spec.split(",") if "=" in item]
        labels = {item.split("=")[0].strip() for item in spec.split(",") if item.strip()}
        histogram = scraped.prometheus.query(f"{name}_count") != []
        selector = f"{name}_count" if histogram else name
        series = scraped.prometheus.query(f"{selector}{{{','.join(matchers)}}}")
        if not any(labels <= s.labels.keys() for s in series):
            problems.append(f"{name}{{{spec}}}: no series with {sorted(labels)}")
    assert not problems, "\n".join(problems)


def test_dashboard_and_rules_name_metrics_the_exporters_have(scraped: Scraped) -> None:
    """Together with the checks above: no metric they use is missing from the scrape."""
    exprs = [expr for _, expr, _ in panel_targets()] + [r["expr"] for r in alert_rules()]
    names = {metric_name(s) for e in exprs for s in vector_selectors(e)}
    scraped_names = set(scraped.prometheus.api("label/__name__/values"))
    assert names <= scraped_names, names - scraped_names
