"""gateway.config: the gateway's config loader, and that it stays free of DICOM code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig
from gateway.configfile import load_gateway_config
from gateway.limits import AllSourcesLimits, DeviceLimits, SourceLimits
from relay.ops.config import Address, ConfigError, LinkSettings, TlsFiles

REPO = Path(__file__).resolve().parents[2]
GATEWAY_FILES = ("ca.crt", "gateway.crt", "gateway.key")
TLS = {
    "cert": "../certs/dev/gateway.crt",
    "key": "../certs/dev/gateway.key",
    "ca": "../certs/dev/ca.crt",
}


def example(tmp_path: Path) -> Path:
    """config/gateway.yaml copied into tmp, with dummy files where `relay pki init` writes."""
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "gateway.yaml", tmp_path / "config" / "gateway.yaml")
    dev = tmp_path / "certs" / "dev"
    dev.mkdir(parents=True)
    for name in GATEWAY_FILES:
        (dev / name).write_text("dummy\n")
    return tmp_path / "config" / "gateway.yaml"


def edit(path: Path, **changes: Any) -> Path:
    """Set top-level keys (None: delete the key) and write the file back."""
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def test_example_loads(tmp_path: Path) -> None:
    path = example(tmp_path)
    config = load_gateway_config(path)
    dev = tmp_path / "certs" / "dev"
    assert isinstance(config, GatewayConfig)
    assert config.path == path
    assert config.listen == Address("127.0.0.1", 8443)
    assert config.metrics_listen == Address("127.0.0.1", 9101)
    assert config.tls == TlsFiles(dev / "gateway.crt", dev / "gateway.key", dev / "ca.crt")
    assert config.limits == LinkSettings()
    assert (config.drain_grace, config.handshake_timeout) == (30.0, 10.0)
    assert (config.max_links, config.log_level) == (10000, "info")
    assert config.heap_slack == 16 * 1024 * 1024


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    path = example(tmp_path)
    path.write_text(
        "listen: '[::1]:0'\n"
        "tls: {cert: ../certs/dev/gateway.crt, key: ../certs/dev/gateway.key,"
        " ca: ../certs/dev/ca.crt}\n"
    )
    config = load_gateway_config(path)
    assert config.listen == Address("::1", 0)
    assert config.metrics_listen is None
    assert config.limits == LinkSettings()
    assert (config.drain_grace, config.handshake_timeout, config.max_links) == (30.0, 10.0, 10000)
    assert config.log_level == "info"


def test_values_parse(tmp_path: Path) -> None:
    path = edit(
        example(tmp_path),
        drain_grace="2m",
        handshake_timeout=2.5,
        max_links=50,
        heap_slack="64MiB",
        log_level="debug",
        limits={"max_streams": 1000, "keepalive_interval": "5s", "keepalive_timeout": "20s"},
    )
    config = load_gateway_config(path)
    assert (config.drain_grace, config.handshake_timeout) == (120.0, 2.5)
    assert (config.max_links, config.log_level) == (50, "debug")
    assert config.heap_slack == 64 * 1024 * 1024
    assert config.limits == LinkSettings(
        max_streams=1000, keepalive_interval=5.0, keepalive_timeout=20.0
    )


def test_per_device_and_per_source(tmp_path: Path) -> None:
    path = example(tmp_path)
    defaults = load_gateway_config(path)
    assert (defaults.per_device, defaults.per_source) == (DeviceLimits(), SourceLimits())
    path = edit(
        path,
        per_device={"links": 2, "streams": 8, "buffered": "8MiB", "agent_reserve": 16},
        per_source={"handshakes": 5, "handshake_rate": 7, "handshake_burst": 9},
    )
    config = load_gateway_config(path)
    assert config.per_device == DeviceLimits(
        links=2, streams=8, buffered=8 * 1024 * 1024, agent_reserve=16
    )
    assert config.per_source == SourceLimits(handshakes=5, handshake_rate=7, handshake_burst=9)


def test_all_sources(tmp_path: Path) -> None:
    path = example(tmp_path)
    assert load_gateway_config(path).all_sources == AllSourcesLimits()
    path = edit(path, all_sources={"handshakes": 50, "handshake_rate": 70, "handshake_burst": 90})
    config = load_gateway_config(path)
    assert config.all_sources == AllSourcesLimits(
        handshakes=50, handshake_rate=70, handshake_burst=90
    )


ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"listn": "127.0.0.1:1"}, "listn", "did you mean 'listen'"),
    ({"tls": {**TLS, "chain": "../certs/dev/ca.crt"}}, "tls.chain", "unknown key"),
    ({"limits": {"window": 1}}, "limits.window", "unknown key"),
    ({"listen": None}, "listen", "missing required key"),
    ({"tls": None}, "tls", "missing required key"),
    ({"tls": "gateway.crt"}, "tls", "expected a mapping"),
    ({"listen": "127.0.0.1"}, "listen", "no port"),
    ({"listen": "127.0.0.1:65536"}, "listen", "port 0-65535"),
    ({"listen": "::1:8443"}, "listen", "brackets"),
    ({"metrics_listen": "127.0.0.1:8443"}, "metrics_listen", "must differ from listen"),
    ({"limits": {"link_window": "1.5MiB"}}, "limits.link_window", "expected a size"),
    ({"limits": {"stream_window": "32KiB"}}, "limits.stream_window", "64KiB"),
    ({"drain_grace": "30 seconds"}, "drain_grace", "expected a duration"),
    ({"handshake_timeout": 0}, "handshake_timeout", "above 0s"),
    ({"max_links": "many"}, "max_links", "expected an integer 1-1000000, got 'many'"),
    ({"heap_slack": "512KiB"}, "heap_slack", "expected a size 1MiB-4GiB"),
    ({"heap_slack": "8GiB"}, "heap_slack", "expected a size 1MiB-4GiB"),
    ({"log_level": "trace"}, "log_level", "expected one of debug, info, warning, error"),
    ({"per_device": {"links": 0}}, "per_device.links", "expected an integer 1-10000"),
    ({"per_device": {"sessions": 2}}, "per_device.sessions", "unknown key"),
    ({"per_device": {"buffered": "1MiB"}}, "per_device.buffered", "2 x limits.stream_window"),
    ({"per_device": {"buffered": "16MiB"}}, "per_device.buffered", "below limits.link_window"),
    ({"per_source": {"handshakes": 0}}, "per_source.handshakes", "expected an integer 1-"),
    ({"per_source": {"handshake_rate": 0}}, "per_source.handshake_rate", "expected an integer 1-"),
    ({"per_source": {"handshake_burst": "x"}}, "per_source.handshake_burst", "expected an integer"),
    ({"all_sources": {"handshakes": 0}}, "all_sources.handshakes", "expected an integer 1-"),
    ({"all_sources": {"handshake_rate": 1.5}}, "all_sources.handshake_rate", "got 1.5"),
    ({"all_sources": {"handshake_burst": 10**7}}, "all_sources.handshake_burst", "1-1000000"),
    ({"all_sources": {"rate": 5}}, "all_sources.rate", "unknown key"),
    ({"all_sources": 300}, "all_sources", "expected a mapping"),
]


@pytest.mark.parametrize(("changes", "key", "text"), ERRORS)
def test_errors_name_file_and_key(
    tmp_path: Path, changes: dict[str, Any], key: str, text: str
) -> None:
    path = edit(example(tmp_path), **changes)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("missing", "key"),
    [("gateway.crt", "tls.cert"), ("gateway.key", "tls.key"), ("ca.crt", "tls.ca")],
)
def test_missing_cert_file(tmp_path: Path, missing: str, key: str) -> None:
    path = example(tmp_path)
    resolved = tmp_path / "certs" / "dev" / missing
    resolved.unlink()
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert str(info.value) == f"{path}: {key}: file not found: {resolved}"


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: 127.0.0.1:8443\ntls: {cert: a, key: b\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert str(info.value).startswith(f"{path}: line 3, column 1: YAML syntax error")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("[127.0.0.1:8443]\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_gateway_config(path)


def test_gateway_config_imports_no_dicom_or_compression_code() -> None:
    code = (
        "import sys, gateway.config\n"
        "banned = {'pydicom', 'pynetdicom', 'zstandard'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'relay', 'gateway'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == "[]"
    # `limits:` is the protocol core's LinkSettings: the sans-I/O core comes along.
    proto = ["relay.proto", *(f"relay.proto.{m}" for m in ("errors", "events", "flow", "frames"))]
    proto += ["relay.proto.mux", "relay.proto.priority", "relay.proto.settings"]
    expected = ["gateway", "gateway.config", "relay", "relay.ops", "relay.ops.config", *proto]
    expected.append("gateway.limits")  # per_device:, per_source: (no I/O)
    expected.append("relay.ops.ratelimit")  # gateway.limits' session-open buckets (no I/O)
    assert out[1] == str(sorted(expected))
