"""relay.ops.config (shared parsing), and the agent and workstation config loaders."""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.provisional import domains

from relay.agent.config import AGENT_LINK_SETTINGS, AgentConfig, load_agent_config
from relay.dicom.pacs_target import DEFAULT_MOVE_LISTEN, PacsTarget
from relay.ops.config import (
    Address,
    Backoff,
    ConfigError,
    FieldError,
    LinkSettings,
    TlsFiles,
    check_ae_title,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_size,
)
from relay.workstation.config import WorkstationConfig, load_workstation_config

REPO = Path(__file__).resolve().parents[2]
DEV_FILES = ("ca.crt", "ca.key", "gateway.crt", "gateway.key", "agent.crt", "agent.key")
DEVICE_FILES = ("device.crt", "device.key", "ca.crt")


def example_tree(tmp_path: Path) -> Path:
    """A copy of config/ with dummy files where `relay pki init/issue` would write them."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    dev = tmp_path / "certs" / "dev"
    (dev / "laptop").mkdir(parents=True)
    for name in DEV_FILES:
        (dev / name).write_text("dummy\n")
    for name in DEVICE_FILES:
        (dev / "laptop" / name).write_text("dummy\n")
    return tmp_path


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Apply `change` to the YAML mapping in `path` and write it back."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (65536, 65536),
        ("65536", 65536),
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("16MiB", 16 << 20),
        ("2GiB", 2 << 30),
        ("100B", 100),
        ("64 kib", 65536),
        (0, 0),
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["64KB", "1.5MiB", "-1", -1, "", "MiB", "64 KiB extra", True, None, 1.0, [1]]
)
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n
    assert parse_size(str(n)) == n


def test_format_size_picks_the_largest_exact_unit() -> None:
    assert format_size(64 * 1024) == "64KiB"
    assert format_size(16 << 20) == "16MiB"
    assert format_size(1000) == "1000"


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (15, 15.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("0.5s", 0.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("30d", 30 * 86400.0),
        ("250ms", 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["-1", -1, "10y", "", "s", "1h30m", "1e400", float("nan"), float("inf"), True, None]
)
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_duration_round_trip_float(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["s", "m", "h", "d"]))
def test_duration_round_trip_units(n: int, unit: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    seconds = parse_duration(f"{n}{unit}")
    assert seconds == n * factor
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_picks_the_largest_exact_unit() -> None:
    assert format_duration(30 * 86400) == "30d"
    assert format_duration(90) == "90s"
    assert format_duration(900) == "15m"
    assert format_duration(0.5) == "0.5s"


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8443", "127.0.0.1", 8443),
        ("[::1]:8443", "::1", 8443),
        ("gw.example.org:8443", "gw.example.org", 8443),
        ("localhost:1", "localhost", 1),
        ("relay-gw.relay.svc.cluster.local:65535", "relay-gw.relay.svc.cluster.local", 65535),
    ],
)
def test_parse_address_accepts(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert str(address) == text


def test_address_str_brackets_ipv6() -> None:
    assert str(Address("::1", 443)) == "[::1]:443"
    assert str(Address("10.0.0.1", 443)) == "10.0.0.1:443"


def test_parse_address_default_port() -> None:
    assert parse_address("gw.example.org", default_port=8443) == Address("gw.example.org", 8443)
    assert parse_address("[::1]", default_port=443) == Address("::1", 443)
    assert parse_address("gw:1", default_port=8443) == Address("gw", 1)


def test_parse_address_port_zero_only_for_listeners() -> None:
    with pytest.raises(ValueError, match="port 1-65535"):
        parse_address("127.0.0.1:0")
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == Address("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("gw.example.org", "no port"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:-1", "port"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:\uff18\uff14\uff14\uff13", "port"),  # fullwidth digits
        (":8443", "no host"),
        ("::1:8443", "brackets"),
        ("[1.2.3.4]:80", "IPv6"),
        ("[::g]:80", "IPv6"),
        ("1.2.3.999:80", "IPv4"),
        ("bad host:80", "host name"),
        ("-gw.example.org:80", "host name"),
        ("", "no host"),
    ],
)
def test_parse_address_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(text)


ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
dns_hosts = domains(max_length=253)


@given(st.one_of(ipv4_hosts, ipv6_hosts, dns_hosts), st.integers(1, 65535))
def test_address_round_trip(host: str, port: int) -> None:
    address = Address(host, port)
    assert parse_address(str(address)) == address


@given(st.one_of(ipv4_hosts, ipv6_hosts), st.integers(0, 65535))
def test_address_loopback(host: str, port: int) -> None:
    assert Address(host, port).is_loopback == ipaddress.ip_address(host).is_loopback


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("title", ["RELAY", "ORTHANC", "A", "STORE SCP", "X" * 16, "A-B_C.D"])
def test_ae_title_accepts(title: str) -> None:
    assert check_ae_title(title) == title


@pytest.mark.parametrize("title", ["", "X" * 17, "A\\B", " RELAY", "RELAY ", "ÄRZTE", "A\tB", 42])
def test_ae_title_refuses(title: object) -> None:
    with pytest.raises(ValueError, match="AE title"):
        check_ae_title(title)


# --------------------------------------------------------------------------- dataclasses


def test_link_settings_defaults() -> None:
    limits = LinkSettings()
    assert limits.stream_window == 1 << 20
    assert limits.link_window == 16 << 20
    assert limits.max_frame == 64 << 10
    assert limits.max_streams == 256
    assert (limits.keepalive_interval, limits.keepalive_timeout) == (15.0, 45.0)
    assert Backoff() == Backoff(0.5, 30.0)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_frame": 16 * 1024 - 1}, "max_frame"),
        ({"max_frame": (1 << 20) + 1}, "max_frame"),
        ({"stream_window": 64 * 1024 - 1}, "stream_window"),
        ({"link_window": 2**31}, "link_window"),
        ({"stream_window": 2 << 20, "link_window": 1 << 20}, "link_window"),
        ({"max_streams": 0}, "max_streams"),
        ({"max_streams": 65536}, "max_streams"),
        ({"keepalive_interval": 0}, "keepalive_interval"),
        ({"keepalive_timeout": 15.0}, "keepalive_timeout"),
    ],
)
def test_link_settings_invariants(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as info:
        LinkSettings(**fields)
    assert info.value.field == field


def test_link_settings_edges_accepted() -> None:
    LinkSettings(stream_window=64 * 1024, link_window=64 * 1024, max_frame=16 * 1024)
    LinkSettings(stream_window=2**31 - 1, link_window=2**31 - 1, max_frame=1 << 20)
    LinkSettings(max_streams=1)
    LinkSettings(max_streams=65535)


def test_backoff_invariants() -> None:
    with pytest.raises(FieldError):
        Backoff(initial=0)
    with pytest.raises(FieldError) as info:
        Backoff(initial=5, maximum=1)
    assert info.value.field == "max"


def test_config_error_attributes_and_text() -> None:
    err = ConfigError("config/agent.yaml", "pacs.port", "expected an integer 1-65535, got 'abc'")
    assert str(err) == "config/agent.yaml: pacs.port: expected an integer 1-65535, got 'abc'"
    assert err.file == Path("config/agent.yaml")
    assert err.key == "pacs.port"
    assert str(ConfigError("a.yaml", None, "bad")) == "a.yaml: bad"


# --------------------------------------------------------------------------- agent


def test_agent_example_loads(tmp_path: Path) -> None:
    root = example_tree(tmp_path)
    config = load_agent_config(root / "config" / "agent.yaml")
    dev = root / "certs" / "dev"
    assert isinstance(config, AgentConfig)
    assert config.path == root / "config" / "agent.yaml"
    assert config.site == "main"
    assert config.gateways == (Address("127.0.0.1", 8443),)
    assert config.tls == TlsFiles(dev / "agent.crt", dev / "agent.key", dev / "ca.crt")
    assert config.pki is not None
    assert (config.pki.ca_cert, config.pki.ca_key) == (dev / "ca.crt", dev / "ca.key")
    assert config.state_dir == root / "config" / "state"
    assert not config.state_dir.exists()
    assert config.metrics_listen == Address("127.0.0.1", 9102)
    pacs = config.pacs
    assert pacs is not None
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert pacs.address == Address("127.0.0.1", 4242)
    assert (pacs.calling_ae_title, pacs.retrieve, pacs.move_listen) == ("RELAY", "get", None)
    assert pacs.timeout == 30.0
    assert set(config.services) == {"ris-web", "reports"}
    assert config.services["ris-web"].address == Address("127.0.0.1", 8080)
    assert config.services["ris-web"].compress is False
    assert config.services["reports"].address == Address("127.0.0.1", 8081)
    assert config.services["reports"].compress is True
    assert config.limits == AGENT_LINK_SETTINGS
    assert config.reconnect == Backoff(0.5, 30.0)
    assert (config.resolve_interval, config.compression_level) == (30.0, 3)
    assert (config.drain_grace, config.log_level) == (30.0, "info")


def test_agent_minimal_config_takes_defaults(tmp_path: Path) -> None:
    root = example_tree(tmp_path)
    path = root / "config" / "min.yaml"
    path.write_text(
        "site: main\ngateways: [gw.example.org:8443, '[::1]:8443']\nstate_dir: /var/lib/relay\n"
        "tls: {cert: ../certs/dev/agent.crt, key: ../certs/dev/agent.key,\n"
        "      ca: ../certs/dev/ca.crt}\n"
    )
    config = load_agent_config(path)
    assert config.gateways == (Address("gw.example.org", 8443), Address("::1", 8443))
    assert config.state_dir == Path("/var/lib/relay")
    assert (config.pki, config.pacs, config.metrics_listen) == (None, None, None)
    assert dict(config.services) == {}
    assert config.limits == AGENT_LINK_SETTINGS
    assert config.log_level == "info"


def test_agent_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = example_tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_agent_config(Path("..") / "config" / "agent.yaml")
    assert config.tls.cert == root / "certs" / "dev" / "agent.crt"
    assert config.state_dir == root / "config" / "state"


def test_agent_retrieve_move_gets_a_storage_scp(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"
    rewrite(path, lambda d: d["pacs"].update(retrieve="move"))
    pacs = load_agent_config(path).pacs
    assert pacs is not None
    assert (pacs.retrieve, pacs.move_listen, pacs.move_ae_title) == (
        "move",
        Address("127.0.0.1", 0),
        "RELAYAGENT",
    )
    rewrite(path, lambda d: d["pacs"].update(move_listen="127.0.0.1:11119", move_ae_title="AG"))
    pacs = load_agent_config(path).pacs
    assert pacs is not None
    assert (pacs.move_listen, pacs.move_ae_title) == (Address("127.0.0.1", 11119), "AG")


def test_agent_move_senders_parse_and_are_checked(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"
    rewrite(path, lambda d: d["pacs"].update(retrieve="move"))
    pacs = load_agent_config(path).pacs
    assert pacs is not None and (pacs.move_senders, pacs.move_sender_ae_titles) == ((), ())
    senders = ["pacs-node2.example.org", "10.1.2.0/24", "2001:db8::7"]
    rewrite(path, lambda d: d["pacs"].update(move_senders=senders, move_sender_ae_titles=["N2"]))
    pacs = load_agent_config(path).pacs
    assert pacs is not None
    assert (pacs.move_senders, pacs.move_sender_ae_titles) == (tuple(senders), ("N2",))
    rewrite(path, lambda d: d["pacs"].update(move_senders=["bad host!"]))
    with pytest.raises(ConfigError, match=r"pacs\.move_senders\[0\]"):
        load_agent_config(path)
    rewrite(path, lambda d: d["pacs"].update(move_senders=[f"10.0.0.{i}" for i in range(65)]))
    with pytest.raises(ConfigError, match="move_senders"):
        load_agent_config(path)


def test_agent_limits_and_durations_parse(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"

    def change(d: dict[str, Any]) -> None:
        d["limits"] = {"stream_window": "4MiB", "link_window": 64 << 20, "max_frame": "16KiB"}
        d["reconnect"] = {"initial": "250ms", "max": "2m"}
        d["resolve_interval"] = "1h"

    config = load_agent_config(rewrite(path, change))
    assert config.limits == LinkSettings(
        stream_window=4 << 20, link_window=64 << 20, max_frame=16 << 10, max_streams=4096
    )
    assert config.reconnect == Backoff(0.25, 120.0)
    assert config.resolve_interval == 3600.0


# --------------------------------------------------------------------------- one type per section


def test_agent_pacs_section_is_the_type_the_dicom_agent_uses(tmp_path: Path) -> None:
    """The file and the code get the same defaults: there is one PACS type."""
    path = example_tree(tmp_path) / "config" / "agent.yaml"
    assert load_agent_config(path).pacs == PacsTarget("ORTHANC", "127.0.0.1", 4242)
    rewrite(path, lambda d: d["pacs"].update(retrieve="move"))
    loaded = load_agent_config(path).pacs
    in_code = PacsTarget("ORTHANC", "127.0.0.1", 4242, retrieve="move")
    assert loaded == in_code
    assert (in_code.move_ae_title, in_code.move_listen) == ("RELAYAGENT", DEFAULT_MOVE_LISTEN)


def test_agent_spare_association_parses_and_zero_turns_it_off(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"

    def spare() -> float:
        pacs = load_agent_config(path).pacs
        assert pacs is not None
        return pacs.spare_association

    assert spare() == PacsTarget.spare_association
    rewrite(path, _set("pacs", "spare_association", "5s"))
    assert spare() == 5.0
    rewrite(path, _set("pacs", "spare_association", "0s"))
    assert spare() == 0.0


def test_pacs_target_bounds_name_their_key() -> None:
    with pytest.raises(FieldError) as info:
        PacsTarget("ORTHANC", "127.0.0.1", 4242, timeout=0)
    assert info.value.field == "timeout"
    with pytest.raises(FieldError) as info:
        PacsTarget("ORTHANC", "127.0.0.1", 4242, retrieve="move", move_ae_title="")
    assert info.value.field == "move_ae_title"
    with pytest.raises(FieldError) as info:
        PacsTarget("ORTHANC", "127.0.0.1", 4242, spare_association=61)
    assert info.value.field == "spare_association"


@pytest.mark.parametrize(
    ("key", "value", "fields"),
    [
        ("max_frame", "2MiB", {"max_frame": 2 << 20}),
        ("max_frame", "8KiB", {"max_frame": 8 << 10}),
        ("keepalive_interval", "2d", {"keepalive_interval": 2 * 86400.0}),
        ("link_window", "512KiB", {"link_window": 512 << 10}),
    ],
)
def test_limits_section_is_link_settings_with_one_set_of_bounds(
    tmp_path: Path, key: str, value: str, fields: dict[str, Any]
) -> None:
    """What the file refuses, the protocol core refuses, with the same words."""
    path = example_tree(tmp_path) / "config" / "agent.yaml"
    assert type(load_agent_config(path).limits) is LinkSettings
    with pytest.raises(FieldError) as in_code:
        LinkSettings(**fields)
    rewrite(path, _set("limits", key, value))
    with pytest.raises(ConfigError) as in_file:
        load_agent_config(path)
    assert (in_file.value.key, in_file.value.message) == (f"limits.{key}", str(in_code.value))


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *keys, value = keys_and_value

    def change(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value

    return change


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return change


AGENT_ERRORS = [
    # (change, dotted key, part of the message)
    (_set("colour", "blue"), "colour", "unknown key"),
    (_set("pacs", "aetitle", "X"), "pacs.aetitle", "unknown key (did you mean 'ae_title'?)"),
    (_set("limits", "max_frames", 1), "limits.max_frames", "did you mean 'max_frame'"),
    (_set("services", "reports", "comprss", True), "services.reports.comprss", "unknown key"),
    (_set("tls", "crt", "x"), "tls.crt", "unknown key"),
    (_drop("site"), "site", "missing required key"),
    (_drop("gateways"), "gateways", "expected at least 1"),
    (_drop("tls"), "tls", "missing required key"),
    (_drop("tls", "ca"), "tls.ca", "missing required key"),
    (_drop("state_dir"), "state_dir", "missing required key"),
    (_drop("pacs", "port"), "pacs.port", "missing required key"),
    (_set("pacs", "port", None), "pacs.port", "got null"),
    (_set("gateways", ["gw.example.org"]), "gateways[0]", "no port"),
    (_set("gateways", ["127.0.0.1:8443", "::1:8443"]), "gateways[1]", "brackets"),
    (_set("gateways", ["127.0.0.1:8443", "127.0.0.1:8443"]), "gateways[1]", "listed twice"),
    (_set("gateways", "127.0.0.1:8443"), "gateways", "expected a list"),
    (_set("metrics_listen", "127.0.0.1:99999"), "metrics_listen", "port 0-65535"),
    (_set("pacs", "port", "abc"), "pacs.port", "expected an integer 1-65535, got 'abc'"),
    (_set("pacs", "port", 0), "pacs.port", "expected an integer 1-65535, got 0"),
    (_set("pacs", "port", True), "pacs.port", "got true"),
    (_set("pacs", "host", "bad host"), "pacs.host", "invalid host name"),
    (_set("pacs", "ae_title", "TOO-LONG-AE-TITLE"), "pacs.ae_title", "AE title"),
    (_set("pacs", "calling_ae_title", "A\\B"), "pacs.calling_ae_title", "AE title"),
    (_set("pacs", "retrieve", "fetch"), "pacs.retrieve", "expected one of get, move"),
    (_set("pacs", "timeout", "0s"), "pacs.timeout", "expected a duration above 0s"),
    (_set("pacs", "spare_association", "2m"), "pacs.spare_association", "expected a duration"),
    (_set("log_level", "verbose"), "log_level", "expected one of debug, info, warning, error"),
    (_set("limits", "max_frame", "64KB"), "limits.max_frame", "expected a size"),
    (_set("limits", "max_frame", "2MiB"), "limits.max_frame", "16KiB-1MiB, got 2MiB"),
    (_set("limits", "stream_window", "32MiB"), "limits.link_window", "at least stream_window"),
    (_set("limits", "max_streams", 70000), "limits.max_streams", "1-65535"),
    (_set("limits", "keepalive_timeout", "10s"), "limits.keepalive_timeout", "longer"),
    (_set("limits", 5), "limits", "expected a mapping"),
    (_set("reconnect", "max", "10y"), "reconnect.max", "expected a duration"),
    (_set("reconnect", "initial", "-1s"), "reconnect.initial", "expected a duration"),
    (_set("reconnect", "max", "0.1s"), "reconnect.max", "from initial"),
    (_set("drain_grace", "2h"), "drain_grace", "expected a duration 0s to 1h"),
    (_set("resolve_interval", "0.5s"), "resolve_interval", "1s to 1d"),
    (_set("compression_level", 20), "compression_level", "expected an integer 1-19"),
    (_set("site", "main site"), "site", "invalid site name 'main site'"),
    (_set("site", False), "site", "quote it"),
    (_set("services", "dicom", "127.0.0.1:1"), "services.dicom", "reserved"),
    (
        _set("services", "bad name", "127.0.0.1:1"),
        'services["bad name"]',
        "invalid service name 'bad name'",
    ),
    (_set("services", "ris-web", "127.0.0.1"), "services.ris-web", "no port"),
    (
        _set("services", "reports", "compress", "yes please"),
        "services.reports.compress",
        "expected true or false",
    ),
    (_drop("services", "reports", "address"), "services.reports.address", "missing required"),
    (_set("services", ["a"]), "services", "expected a mapping"),
    (_set("state_dir", 5), "state_dir", "expected a path"),
    (_set("state_dir", "st\0ate"), "state_dir", "cannot contain a NUL"),
]


@pytest.mark.parametrize(("change", "key", "text"), AGENT_ERRORS)
def test_agent_errors_name_file_and_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], key: str, text: str
) -> None:
    path = rewrite(example_tree(tmp_path) / "config" / "agent.yaml", change)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    err = info.value
    assert err.key == key
    assert err.file == path
    assert str(err).startswith(f"{path}: {key}: ")
    assert text in str(err)


def test_agent_bad_port_message_is_exact(tmp_path: Path) -> None:
    path = rewrite(example_tree(tmp_path) / "config" / "agent.yaml", _set("pacs", "port", "abc"))
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert str(info.value) == f"{path}: pacs.port: expected an integer 1-65535, got 'abc'"


@pytest.mark.parametrize(
    ("missing", "key"),
    [
        ("agent.key", "tls.key"),
        ("agent.crt", "tls.cert"),
        ("ca.crt", "tls.ca"),
        ("ca.key", "pki.ca_key"),
    ],
)
def test_agent_missing_cert_file(tmp_path: Path, missing: str, key: str) -> None:
    root = example_tree(tmp_path)
    resolved = root / "certs" / "dev" / missing
    resolved.unlink()
    with pytest.raises(ConfigError) as info:
        load_agent_config(root / "config" / "agent.yaml")
    assert info.value.key == key
    assert f"agent.yaml: {key}: file not found: {resolved}" in str(info.value)


def test_cert_path_that_is_a_directory(tmp_path: Path) -> None:
    root = example_tree(tmp_path)
    path = rewrite(root / "config" / "agent.yaml", _set("tls", "cert", "../certs/dev/laptop"))
    with pytest.raises(ConfigError, match=r"tls\.cert: not a regular file"):
        load_agent_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site: main\ngateways: [127.0.0.1:8443\n", "line 3"),
        ("site: main\n  bad: indent\n", "line 2"),
        ("site: [\n", "line 2"),
        ("site: main\nsite: other\n", "duplicate key 'site'"),
        ("\tsite: main\n", "line 1"),
    ],
)
def test_yaml_syntax_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert info.value.key is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "top level must be a mapping of keys, got a list"),
        ("just text\n", "top level must be a mapping of keys, got 'just text'"),
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("1: x\n", "keys must be text"),
    ],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"site: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent_config(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1MiB"):
        load_agent_config(huge)


def test_unknown_key_is_reported_with_a_misspelling_hint_when_required_is_missing(
    tmp_path: Path,
) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"

    def change(d: dict[str, Any]) -> None:
        d["sight"] = d.pop("site")

    with pytest.raises(ConfigError) as info:
        load_agent_config(rewrite(path, change))
    assert info.value.key == "site"
    assert "'sight' a misspelling" in str(info.value)


# --------------------------------------------------------------------------- workstation


def test_workstation_example_loads(tmp_path: Path) -> None:
    root = example_tree(tmp_path)
    config = load_workstation_config(root / "config" / "workstation.yaml")
    identity = root / "certs" / "dev" / "laptop"
    assert isinstance(config, WorkstationConfig)
    assert config.gateway == Address("127.0.0.1", 8443)
    assert config.identity_dir == identity
    assert config.identity_files() == TlsFiles(
        identity / "device.crt", identity / "device.key", identity / "ca.crt"
    )
    assert config.metrics_listen == Address("127.0.0.1", 9103)
    assert config.dicom is not None
    assert config.dicom.listen == Address("127.0.0.1", 11112)
    assert config.dicom.ae_title == "RELAY"
    assert dict(config.dicom.destinations) == {"VIEWER": Address("127.0.0.1", 11113)}
    assert config.dicom.resume_window == 30.0
    assert dict(config.forward) == {Address("127.0.0.1", 18080): "ris-web"}
    assert config.limits == LinkSettings()
    assert config.reconnect == Backoff()
    assert (config.drain_grace, config.log_level) == (30.0, "info")


def test_workstation_minimal_config(tmp_path: Path) -> None:
    root = example_tree(tmp_path)
    path = root / "config" / "min.yaml"
    path.write_text(
        "gateway: '[::1]:8443'\nidentity_dir: ../certs/dev/laptop\n"
        "forward: {'[::1]:0': ris-web, 'localhost:18081': reports}\n"
    )
    config = load_workstation_config(path)
    assert config.gateway == Address("::1", 8443)
    assert (config.dicom, config.metrics_listen) == (None, None)
    assert dict(config.forward) == {
        Address("::1", 0): "ris-web",
        Address("localhost", 18081): "reports",
    }


def test_workstation_prefetch_match_takes_text_numbers_and_lists(tmp_path: Path) -> None:
    match = {"ModalitiesInStudy": ["CT", "MR"], "StudyID": 42, "PatientID": "P*"}
    path = rewrite(
        example_tree(tmp_path) / "config" / "workstation.yaml",
        _set("prefetch", "rules", [{"name": "ct", "match": match}]),
    )
    (rule,) = load_workstation_config(path).prefetch.rules
    assert dict(rule.match) == {"ModalitiesInStudy": "CT\\MR", "StudyID": "42", "PatientID": "P*"}


def test_workstation_cache_and_rule_bounds_take_their_edges(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "workstation.yaml"
    rules = [{"name": n, "every": e, "match": {"StudyID": 1}} for n, e in (("a", 10), ("b", "7d"))]
    rewrite(path, _set("cache", "max_size", "65536GiB"))
    config = load_workstation_config(rewrite(path, _set("prefetch", "rules", rules)))
    assert config.cache is not None and config.cache.max_size == 64 << 40
    assert [rule.every for rule in config.prefetch.rules] == [10.0, 7 * 86400.0]


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0.0), ("90s", 90.0), ("1h", 3600.0)])
def test_workstation_resume_window(tmp_path: Path, text: str, seconds: float) -> None:
    path = rewrite(
        example_tree(tmp_path) / "config" / "workstation.yaml",
        _set("dicom", "resume_window", text),
    )
    config = load_workstation_config(path)
    assert config.dicom is not None
    assert config.dicom.resume_window == seconds


WORKSTATION_ERRORS = [
    (_set("colour", "blue"), "colour", "unknown key"),
    (_set("dicom", "aetitle", "X"), "dicom.aetitle", "did you mean 'ae_title'"),
    (_drop("gateway"), "gateway", "missing required key"),
    (_drop("identity_dir"), "identity_dir", "missing required key"),
    (_set("state_dir", 5), "state_dir", "expected a path"),
    (_set("state_dir", "st\0ate"), "state_dir", "cannot contain a NUL"),
    *(
        (
            _set("prefetch", "rules", [{"name": "ct", "match": {"ModalitiesInStudy": bad}}]),
            "prefetch.rules[0]",
            f"match: ModalitiesInStudy: expected text or a number, got {shown}",
        )
        for bad, shown in ((None, "null"), (True, "true"), ({"CT": 1}, "a mapping"))
    ),
    (_drop("dicom", "listen"), "dicom.listen", "missing required key"),
    (_set("gateway", "gw.example.org"), "gateway", "no port"),
    (_set("gateway", "127.0.0.1:0"), "gateway", "port 1-65535"),
    (_set("gateway", 8443), "gateway", "expected an address"),
    (_set("dicom", "listen", "0.0.0.0:11112"), "dicom.listen", "must be a loopback address"),
    (_set("dicom", "listen", "127.0.0.1:70000"), "dicom.listen", "port 0-65535"),
    (_set("dicom", "ae_title", "A\\B"), "dicom.ae_title", "AE title"),
    (
        _set("dicom", "destinations", "VIEWER\\X", "127.0.0.1:1"),
        'dicom.destinations["VIEWER\\X"]',
        "AE title",
    ),
    (_set("dicom", "destinations", "VIEWER", "127.0.0.1"), "dicom.destinations.VIEWER", "no port"),
    (
        _set("dicom", "destinations", "VIEWER", "10.1.2.3:104"),
        "dicom.destinations.VIEWER",
        "must be on this PC",
    ),
    (_set("dicom", "resume_window", "2h"), "dicom.resume_window", "duration 0s to 1h"),
    (_set("dicom", "resume_window", "-1s"), "dicom.resume_window", "expected a duration"),
    (
        _set("forward", {"192.168.1.5:18080": "ris-web"}),
        'forward["192.168.1.5:18080"]',
        "must be a loopback address",
    ),
    (_set("forward", {"127.0.0.1": "ris-web"}), 'forward["127.0.0.1"]', "no port"),
    (
        _set("forward", {"127.0.0.1:18080": "bad name"}),
        'forward["127.0.0.1:18080"]',
        "invalid service name 'bad name'",
    ),
    (
        _set("forward", {"127.0.0.1:18080": "dicom"}),
        'forward["127.0.0.1:18080"]',
        "not a TCP service",
    ),
    (
        _set("forward", {"127.0.0.1:8080": "a", "127.0.0.1:08080": "b"}),
        'forward["127.0.0.1:8080"]',
        "forwarded twice",
    ),  # safe_dump sorts keys
    (
        _set("forward", {"127.0.0.1:11112": "ris-web"}),
        'forward["127.0.0.1:11112"]',
        "also used by dicom.listen",
    ),
    (_set("metrics_listen", "127.0.0.1:11112"), "dicom.listen", "also used by metrics_listen"),
    (_set("limits", "link_window", "512KiB"), "limits.link_window", "at least stream_window"),
    (_set("reconnect", "maximum", "1s"), "reconnect.maximum", "did you mean 'max'"),
    (_set("drain_grace", "soon"), "drain_grace", "expected a duration"),
    (_set("log_level", "INFO"), "log_level", "expected one of"),
    (_set("cache", "dir", 5), "cache.dir", "expected a path"),
    (_set("cache", "max_size", "512KiB"), "cache.max_size", "at least 1MiB"),
    (
        _set("cache", "max_size", "65537GiB"),
        "cache.max_size",
        f"must be at most 65536GiB (64 TiB), got {65537 << 30}",
    ),
    *(
        (
            _set("prefetch", "rules", [{"name": "ct", "every": every, "match": {"StudyID": 1}}]),
            "prefetch.rules[0]",
            f"every: expected a duration 10s to 7d, got {every!r}",
        )
        for every in ("9s", "8d", "30d", 1e300)
    ),
    (
        _set("prefetch", "rules", [{"name": "ct", "every": "soon", "match": {"StudyID": 1}}]),
        "prefetch.rules[0]",
        "every: expected a duration (30, 90s, 15m, 24h, 30d), got 'soon'",
    ),
    (_set("cache", "max_age", "0s"), "cache.max_age", "expected a duration"),
    (_set("cache", "key", "file"), "cache.key", "expected one of memory, keyring"),
    (_set("cache", "enabled", "yes"), "cache.enabled", "expected true or false"),
    (_set("cache", "serve_buffer", "lots"), "cache.serve_buffer", "expected a size"),
    (_set("cache", "serve_buffer", "17GiB"), "cache.serve_buffer", "at most 16GiB"),
    (_set("cache", "max_sise", "1GiB"), "cache.max_sise", "did you mean 'max_size'"),
]


@pytest.mark.parametrize(("change", "key", "text"), WORKSTATION_ERRORS)
def test_workstation_errors_name_file_and_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], key: str, text: str
) -> None:
    path = rewrite(example_tree(tmp_path) / "config" / "workstation.yaml", change)
    with pytest.raises(ConfigError) as info:
        load_workstation_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert text in str(info.value)


@pytest.mark.parametrize("missing", DEVICE_FILES)
def test_workstation_identity_dir_must_hold_the_identity(tmp_path: Path, missing: str) -> None:
    root = example_tree(tmp_path)
    identity = root / "certs" / "dev" / "laptop"
    (identity / missing).unlink()
    with pytest.raises(ConfigError) as info:
        load_workstation_config(root / "config" / "workstation.yaml")
    assert info.value.key == "identity_dir"
    assert f"{missing} not found in {identity}" in str(info.value)
    assert "relay enroll" in str(info.value)
