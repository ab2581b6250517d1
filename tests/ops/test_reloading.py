"""relay.ops.reloading: what a SIGHUP accepts as the new certificate, and what it keeps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from relay.agent import service as agent_service
from relay.agent.config import AgentConfig
from relay.ops.reloading import (
    ReloadCounter,
    ReloadError,
    check_own_certificate,
    keep_restart_only,
    log_restart_needed,
)
from relay.trust.identity import Identity
from relay.workstation import service as ws_service
from relay.workstation.config import WorkstationConfig
from tests.pki_helpers import SitePki, make_pki


@pytest.fixture
def site(tmp_path: Path) -> SitePki:
    return make_pki(tmp_path / "pki")


def test_a_renewed_certificate_of_the_same_identity_passes(site: SitePki) -> None:
    pair = site.device("ws1")
    identity = check_own_certificate(pair.cert, site.ca, role="device", site="main", name="ws1")
    assert identity == Identity.device("hospital.test", "main", "ws1")
    agent = check_own_certificate(site.agent.cert, site.ca, role="agent", site="main")
    assert agent.role == "agent"
    assert check_own_certificate(site.gateway.cert, site.ca, role="gateway").role == "gateway"


def test_another_identity_is_no_reload(site: SitePki) -> None:
    pair = site.device("other")
    with pytest.raises(ReloadError, match="name 'ws1'"):
        check_own_certificate(pair.cert, site.ca, role="device", site="main", name="ws1")
    with pytest.raises(ReloadError, match="role 'gateway'"):
        check_own_certificate(site.agent.cert, site.ca, role="gateway")
    with pytest.raises(ReloadError, match="site 'east'"):
        check_own_certificate(site.agent.cert, site.ca, role="agent", site="east")


def test_a_certificate_not_valid_now_is_refused(site: SitePki) -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    expired = site.device("ws1", lifetime=timedelta(days=1), not_before=past)
    with pytest.raises(ReloadError, match="not valid now"):
        check_own_certificate(expired.cert, site.ca, role="device")
    future = site.device("ws2", not_before=datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(ReloadError, match="not valid now"):
        check_own_certificate(future.cert, site.ca, role="device")


def test_a_certificate_of_another_ca_or_a_broken_file_is_refused(
    site: SitePki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    with pytest.raises(ReloadError, match="not signed by a CA"):
        check_own_certificate(other.agent.cert, site.ca, role="agent")
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ReloadError, match=r"broken\.crt"):
        check_own_certificate(broken, site.ca, role="agent")
    with pytest.raises(ReloadError, match=r"missing\.crt"):
        check_own_certificate(tmp_path / "missing.crt", site.ca, role="agent")


def test_a_bundle_with_the_issuing_ca_second_passes(site: SitePki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(other.ca.read_bytes() + site.ca.read_bytes())
    assert check_own_certificate(site.agent.cert, bundle, role="agent").site == "main"


@dataclass(frozen=True)
class _Config:
    listen: int
    grace: float
    level: str


def test_keep_restart_only_keeps_running_values_and_names_them() -> None:
    running = _Config(listen=1, grace=2.0, level="info")
    same, changed = keep_restart_only(running, _Config(1, 5.0, "debug"), ["listen"])
    assert (same, changed) == (_Config(1, 5.0, "debug"), [])
    kept, changed = keep_restart_only(running, _Config(9, 5.0, "debug"), ["listen", "level"])
    assert kept == _Config(1, 5.0, "info")
    assert changed == ["listen", "level"]


def test_a_restart_is_asked_for_as_a_warning_and_a_failing_next_start_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = logging.getLogger("relay.test.role")
    with caplog.at_level(logging.INFO, logger="relay.test.role"):
        log_restart_needed(role, [], None)
        log_restart_needed(role, ["listen", "state_dir"], None)
        log_restart_needed(role, ["identity_dir"], "identity_dir: no such directory")
    warned, error = caplog.records  # nothing for a reload that needs no restart
    assert (warned.levelno, warned.name, warned.__dict__["keys"]) == (
        logging.WARNING, "relay.test.role", "listen,state_dir"
    )  # fmt: skip
    assert error.levelno == logging.ERROR and error.__dict__["keys"] == "identity_dir"
    assert error.getMessage().endswith("the next start will fail: identity_dir: no such directory")


def test_reload_counter_exports_both_results() -> None:
    counter = ReloadCounter()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(counter)
    counter.record(True)
    counter.record(False)
    counter.record(False)
    text = generate_latest(registry).decode()
    assert 'relay_reloads_total{result="ok"} 1.0' in text
    assert 'relay_reloads_total{result="error"} 2.0' in text


# What each role's reload applies at once (relay.agent.service.Agent.reload,
# relay.workstation.service.Workstation.reload); every other key must be restart-only.
AGENT_APPLIED = {"path", "gateways", "tls", "limits", "reconnect", "resolve_interval",
                 "compression_level", "drain_grace", "log_level", "services",
                 "max_pacs_operations", "stream_burst", "stream_rate"}  # fmt: skip
WORKSTATION_APPLIED = {"path", "limits", "reconnect", "drain_grace", "log_level", "local_access"}


def test_every_config_key_is_applied_by_a_reload_or_said_to_need_a_restart() -> None:
    """A key neither applied nor restart-only is silently ignored: a reload that lowers
    cache.max_age (a privacy bound) said "reloaded" and the cache kept its old bounds."""
    for config, applied, restart_only in (
        (AgentConfig, AGENT_APPLIED, agent_service.RESTART_ONLY),
        (WorkstationConfig, WORKSTATION_APPLIED, ws_service.RESTART_ONLY),
    ):
        keys = {f.name for f in fields(config)}
        assert keys == applied | set(restart_only), config.__name__
        assert not applied & set(restart_only), config.__name__
