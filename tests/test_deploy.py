"""Checks of deploy/: what IT installs must keep the promises of DESIGN.md section 6.

Static checks parse every file (units, Containerfile, manifests, dashboard, rules) and
load the role configs with the real loaders. Tests marked `interop` run the real tools
(`systemd-analyze`, `haproxy`, `promtool`) and real gateways on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import Metric

from gateway.configfile import load_gateway_config
from gateway.metrics import GatewayMetrics
from relay import wire
from relay.agent.config import load_agent_config
from relay.net import tls
from relay.ops.config import parse_duration
from relay.workstation.config import load_workstation_config
from tests.interop.harness import require_tools, unavailable
from tests.pki_helpers import SitePki, make_pki
from tests.ports import reserve, wait_listening

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ROLES = ("gateway", "agent", "workstation")
HOST = "127.0.0.1"
#: `relay` from this checkout (what the units' /opt/dmz-relay/bin/relay runs).
RELAY = [sys.executable, "-m", "relay.cli"]
WAIT = 30.0  # upper bound of every wait below; nothing asserts on time
#: What a check raises when it cannot run: a skip locally, a failure with CI=true.
OUTCOMES = (pytest.skip.Exception, pytest.fail.Exception)

# --------------------------------------------------------------------------- metric names

#: What the gateway exports (gateway/metrics.py), and what agent and workstation export.
GATEWAY_METRICS = {
    "relay_links",
    "relay_handshakes_total",
    "relay_refusals_total",
    "relay_streams_total",
    "relay_streams_open",
    "relay_bytes_total",
    "relay_revoked_devices",
    "relay_draining",
    "relay_reloads_total",
}
END_METRICS = {
    "relay_links",
    "relay_reconnects_total",
    "relay_certificate_expiry_timestamp_seconds",
    "relay_dicom_operations_total",
    "relay_dicom_operation_duration_seconds",
    "relay_dicom_instances_total",
    "relay_bytes_total",
}
HISTOGRAMS = {"relay_dicom_operation_duration_seconds"}
#: Prometheus's own series for a scrape target.
SYNTHETIC = {"up"}
ALLOWED_METRICS = (
    GATEWAY_METRICS
    | END_METRICS
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | SYNTHETIC
)

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_MODIFIER_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MODIFIER_BARE_RE = re.compile(r"\b(?:group_left|group_right)\b")
_IDENT_RE = re.compile(r"(?<![\w$.:])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions and keywords left out)."""
    text = _STRING_RE.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers (and Grafana $variables)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery selectors
    text = _MODIFIER_RE.sub(" ", text)
    text = _MODIFIER_BARE_RE.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT_RE.finditer(text):
        word, call = match.group(1), match.group(2)
        if call is None and word.lower() not in _PROMQL_KEYWORDS:
            names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (site, outcome) (rate(relay_streams_total{job="x",site=~"$site"}'
        "[$__rate_interval])) / on (site) group_left () count(up == 1) > 0.5 and "
        "histogram_quantile(0.9, sum by (le) "
        "(rate(relay_dicom_operation_duration_seconds_bucket[5m])))"
        " - time() < 7 * 86400 unless bogus_metric offset 5m"
    )
    assert metric_names(expr) == {
        "relay_streams_total",
        "up",
        "relay_dicom_operation_duration_seconds_bucket",
        "bogus_metric",
    }


def test_gateway_exports_the_names_deploy_relies_on() -> None:
    registry = GatewayMetrics().registry
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    }
    assert exported >= GATEWAY_METRICS, GATEWAY_METRICS - exported


# --------------------------------------------------------------------------- role configs


def _rewrite_paths(text: str, root: Path) -> str:
    """Move the absolute production paths (/etc/relay, /var/lib) under `root`."""
    return text.replace("/etc/relay/", f"{root}/etc/relay/").replace(
        "/var/lib/", f"{root}/var/lib/"
    )


def _touch_files(config_text: str, root: Path) -> None:
    """Create the certificate files a config names (the loaders want them to exist)."""
    for match in re.finditer(re.escape(str(root)) + r"/etc/relay/[\w./-]+", config_text):
        path = Path(match.group(0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    identity = root / "var/lib/relay-workstation/identity"
    identity.mkdir(parents=True, exist_ok=True)
    for name in ("device.crt", "device.key", "ca.crt"):
        (identity / name).touch()


LOADERS: dict[str, Callable[[Path], Any]] = {
    "gateway": load_gateway_config,
    "agent": load_agent_config,
    "workstation": load_workstation_config,
}


def load_role_config(role: str, text: str, tmp: Path) -> Any:
    """Load a production config (absolute paths) with the real loader, under `tmp`."""
    rewritten = _rewrite_paths(text, tmp)
    _touch_files(rewritten, tmp)
    path = tmp / f"{role}.yaml"
    path.write_text(rewritten)
    return LOADERS[role](path)


@pytest.mark.parametrize("role", ROLES)
def test_production_configs_load(role: str, tmp_path: Path) -> None:
    text = (DEPLOY / "config" / f"{role}.yaml").read_text()
    assert "/etc/relay/" in text or role == "workstation"
    config = load_role_config(role, text, tmp_path)
    assert config.drain_grace == 30.0
    if role == "agent":
        assert config.state_dir == tmp_path / "var/lib/relay-agent"
    if role == "workstation":
        assert config.identity_dir == tmp_path / "var/lib/relay-workstation/identity"


def test_a_bad_key_in_a_production_config_is_refused(tmp_path: Path) -> None:
    """The load test above can fail: the loader rejects what it does not know."""
    text = (DEPLOY / "config" / "gateway.yaml").read_text() + "\nlisten_typo: 1\n"
    with pytest.raises(Exception, match="listen_typo"):
        load_role_config("gateway", text, tmp_path)


# --------------------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, keeping repeated keys in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        assert "=" in line, f"{path}: not key=value: {line!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def single(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}: expected one value, got {found}"
    return found[0]


UNIT_HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "ExecReload": "/bin/kill -HUP $MAINPID",
}
WRITABLE_KEYS = (
    "ReadWritePaths",
    "StateDirectory",
    "CacheDirectory",
    "LogsDirectory",
    "RuntimeDirectory",
    "ConfigurationDirectory",
    "BindPaths",
    "TemporaryFileSystem",
)


def unit_path(role: str) -> Path:
    return DEPLOY / "systemd" / f"relay-{role}.service"


@pytest.mark.parametrize("role", ROLES)
def test_unit_runs_the_role_with_its_config(role: str) -> None:
    unit = parse_unit(unit_path(role))
    assert set(unit) == {"Unit", "Service", "Install"}
    argv = shlex.split(single(unit["Service"], "ExecStart"))
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "relay"
    assert argv[1:] == [role, "--config", f"/etc/relay/{role}.yaml"]
    assert (DEPLOY / "config" / f"{role}.yaml").is_file()
    assert single(unit["Install"], "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("role", ROLES)
def test_unit_is_hardened(role: str) -> None:
    service = parse_unit(unit_path(role))["Service"]
    for key, expected in UNIT_HARDENING.items():
        assert single(service, key) == expected, key
    filters = values(service, "SystemCallFilter")
    assert "@system-service" in filters
    assert "~@privileged" in filters
    user = values(service, "User")
    assert values(service, "DynamicUser") == ["yes"] or (
        len(user) == 1 and user[0] not in ("", "root", "0")
    )


@pytest.mark.parametrize("role", ROLES)
def test_unit_stop_timeout_exceeds_drain_grace(role: str, tmp_path: Path) -> None:
    service = parse_unit(unit_path(role))["Service"]
    config = load_role_config(role, (DEPLOY / "config" / f"{role}.yaml").read_text(), tmp_path)
    assert parse_duration(single(service, "TimeoutStopSec")) > config.drain_grace


@pytest.mark.parametrize("role", ["gateway", "agent"])
def test_unit_does_not_restart_a_bad_config(role: str, tmp_path: Path) -> None:
    """What a bad config exits with (here a missing file) is not restarted in a loop,
    as the workstation's units do; a crash (1, a traceback) still is."""
    from relay import cli

    service = parse_unit(unit_path(role))["Service"]
    assert single(service, "Restart") == "on-failure"
    prevented = single(service, "RestartPreventExitStatus").split()
    bad_config = cli.main([role, "--config", str(tmp_path / "missing.yaml")])
    assert bad_config == 2
    assert str(bad_config) in prevented
    assert "1" not in prevented and "0" not in prevented


def test_gateway_unit_has_no_writable_path() -> None:
    service = parse_unit(unit_path("gateway"))["Service"]
    for key in WRITABLE_KEYS:
        assert values(service, key) == [], key
    read_only = " ".join(values(service, "ReadOnlyPaths")).split()
    assert {"/tmp", "/var/tmp"} <= set(read_only)


@pytest.mark.parametrize(
    ("role", "state_dir"),
    [("agent", "relay-agent"), ("workstation", "relay-workstation")],
)
def test_ends_write_only_their_state_directory(role: str, state_dir: str, tmp_path: Path) -> None:
    service = parse_unit(unit_path(role))["Service"]
    writable = {key: values(service, key) for key in WRITABLE_KEYS if values(service, key)}
    assert writable == {"StateDirectory": [state_dir]}
    config = load_role_config(role, (DEPLOY / "config" / f"{role}.yaml").read_text(), tmp_path)
    where = [config.state_dir] if role == "agent" else [config.identity_dir, config.state_dir]
    assert all(w.is_relative_to(tmp_path / "var/lib" / state_dir) for w in where), where


def test_sysusers_declares_every_unit_user() -> None:
    declared = set()
    for line in (DEPLOY / "systemd" / "relay.sysusers.conf").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "u":
            declared.add(fields[1])
    for role in ROLES:
        service = parse_unit(unit_path(role))["Service"]
        assert single(service, "User") in declared


def _unit_for_verify(role: str, tmp: Path) -> Path:
    """The unit, with ExecStart pointing at this checkout's `relay` (verify wants it)."""
    relay = Path(sys.executable).parent / "relay"
    if not relay.exists():
        pytest.skip(f"no relay console script at {relay}")
    text = unit_path(role).read_text().replace("/opt/dmz-relay/bin/relay", str(relay))
    path = tmp / unit_path(role).name
    path.write_text(text)
    return path


@pytest.mark.interop
@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_verify(role: str, tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_unit_for_verify(role, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys too: any message at all is a finding.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), (
        out.stdout + out.stderr
    )


@pytest.mark.interop
def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path) -> None:
    """The verify test above can fail: a misspelt hardening key is reported."""
    require_tools("systemd-analyze")
    path = _unit_for_verify("gateway", tmp_path)
    path.write_text(path.read_text().replace("ProtectKernelLogs=", "ProtectKernelLog="))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectKernelLog" in out.stderr


@pytest.mark.interop
@pytest.mark.parametrize("role", ROLES)
def test_systemd_security_exposure_is_low(role: str, tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    out = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=20",  # exposure 2.0 on the 0-10 scale
            "--no-pager",
            str(_unit_for_verify(role, tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr


@pytest.mark.interop
def test_sysusers_file_is_valid(tmp_path: Path) -> None:
    require_tools("systemd-sysusers")
    out = subprocess.run(
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            "--dry-run",
            str(DEPLOY / "systemd" / "relay.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for role in ROLES:
        assert f"Creating user 'relay-{role}'" in out.stdout + out.stderr


# --------------------------------------------------------------------------- MDWE

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Sets the kernel's memory-deny-write-execute on itself (inherited across exec), then
# execs the command: what systemd's MemoryDenyWriteExecute=yes enforces.
_MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE_LAUNCHER, sys.executable, "-c", "pass"],
        timeout=60,
        check=False,
    )
    return probe.returncode == 0


def mdwe(*argv: str) -> list[str]:
    """`argv` under the launcher; skips locally (fails with CI=true) without PR_SET_MDWE."""
    if not _mdwe_supported():
        unavailable("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    return [sys.executable, "-c", _MDWE_LAUNCHER, *argv]


def test_mdwe_missing_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI kernel without PR_SET_MDWE fails the MDWE checks; locally they skip."""
    monkeypatch.setattr(sys.modules[__name__], "_mdwe_supported", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(OUTCOMES, match="PR_SET_MDWE") as outcome:
        mdwe("true")
    assert outcome.type is pytest.fail.Exception  # a skip would escape CI's rule
    monkeypatch.delenv("CI")
    with pytest.raises(OUTCOMES, match="PR_SET_MDWE") as outcome:
        mdwe("true")
    assert outcome.type is pytest.skip.Exception


def test_mdwe_really_refuses_write_execute_memory() -> None:
    """The control: under the launcher, W+X memory is refused (so the tests below can fail)."""
    code = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)"
    out = subprocess.run(
        mdwe(sys.executable, "-c", code), capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode != 0 and "PermissionError" in out.stderr, out.stderr
    plain = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert plain.returncode == 0


def test_end_libraries_work_without_write_execute_memory() -> None:
    """What the agent and workstation load: uvloop, TLS, EC keys, zstd, pydicom, pynetdicom."""
    code = """
import ssl, uvloop, aiohttp, yaml, prometheus_client, zstandard, pydicom, pynetdicom
from cryptography.hazmat.primitives.asymmetric import ec
ec.generate_private_key(ec.SECP256R1())
ssl.create_default_context()
assert zstandard.decompress(zstandard.compress(b"x" * 100000)) == b"x" * 100000
uvloop.run(__import__("asyncio").sleep(0))
print("ok")
"""
    out = subprocess.run(
        mdwe(sys.executable, "-c", code), capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- real gateways


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Gateway:
    popen: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    def ready(self) -> bool:
        return http_status(f"http://{HOST}:{self.metrics_port}/readyz") == 200

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(WAIT)
            raise AssertionError(f"gateway did not stop: {self.log.read_text()[-2000:]}") from None


@dataclass
class Gateways:
    """Real `relay gateway` processes on loopback, sharing a throw-away site PKI."""

    tmp: Path
    pki: SitePki
    started: list[Gateway] = field(default_factory=list)

    def start(self, prefix: Sequence[str] = ()) -> Gateway:
        """Start one (under `prefix`, a launcher) and wait until its /readyz says 200."""
        index = len(self.started)
        config = self.tmp / f"gateway{index}.yaml"
        tls_files = {"cert": self.pki.gateway.cert, "key": self.pki.gateway.key, "ca": self.pki.ca}
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"{HOST}:0",  # it says which ports it got
                    "metrics_listen": f"{HOST}:0",
                    "tls": {k: str(v) for k, v in tls_files.items()},
                    "drain_grace": "5s",
                }
            )
        )
        log = self.tmp / f"gateway{index}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [*prefix, *RELAY, "gateway", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        alive = lambda: popen.poll() is None  # noqa: E731
        port = wait_listening(log, "gateway", alive=alive).port
        metrics_port = wait_listening(log, "metrics", alive=alive).port
        gateway = Gateway(popen, port, metrics_port, log)
        self.started.append(gateway)
        wait_for(f"gateway {index} ready", lambda: gateway.ready() or popen.poll() is not None)
        assert popen.poll() is None, log.read_text()
        return gateway

    def kill_all(self) -> None:
        for gateway in self.started:
            if gateway.popen.poll() is None:
                gateway.popen.kill()
                gateway.popen.wait(WAIT)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    running = Gateways(tmp_path, make_pki(tmp_path / "pki"))
    try:
        yield running
    finally:
        running.kill_all()


def test_gateway_serves_and_drains_under_mdwe(gateways: Gateways) -> None:
    """The systemd unit's MemoryDenyWriteExecute=yes: the real gateway runs under it."""
    gateway = gateways.start(mdwe())
    assert http_status(f"http://{HOST}:{gateway.metrics_port}/healthz") == 200
    assert gateway.stop() == 0


# --------------------------------------------------------------------------- container


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_containerfile(path: Path) -> list[Instruction]:
    """Instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "dangling line continuation"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


CONTAINERFILE = DEPLOY / "container" / "Containerfile"


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, "an instruction before the first FROM"
        result[-1].append(instruction)
    return result


def test_container_is_multi_stage_on_python_311_slim() -> None:
    all_stages = stages(parse_containerfile(CONTAINERFILE))
    assert len(all_stages) >= 2
    for stage in all_stages:
        assert stage[0].args.split()[0].startswith("python:3.11-slim")
    final = all_stages[-1]
    assert any(i.keyword == "COPY" and i.args.startswith("--from=") for i in final)


def test_container_runs_as_non_root_with_relay_entrypoint() -> None:
    final = stages(parse_containerfile(CONTAINERFILE))[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) == 10001
    assert any(i.keyword == "RUN" and "--uid 10001" in i.args for i in final)
    entrypoints = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["relay"]
    # Nothing after USER switches back to root.
    after_user = final[[i.keyword for i in final].index("USER") :]
    assert not any(i.keyword == "RUN" for i in after_user)


SECRET_WORDS = re.compile(r"(?i)(password|passwd|secret|token|private|api_?key)")


def test_container_copies_no_secret() -> None:
    instructions = parse_containerfile(CONTAINERFILE)
    assert not any(i.keyword == "ADD" for i in instructions), "use COPY, not ADD"
    copied: set[str] = set()
    for i in instructions:
        if i.keyword in ("ENV", "ARG", "LABEL"):
            assert not SECRET_WORDS.search(i.args), i.args
        if i.keyword != "COPY" or i.args.startswith("--from="):
            continue
        sources = [a for a in i.args.split() if not a.startswith("--")][:-1]
        copied.update(s.rstrip("/") for s in sources)
    assert copied == {"pyproject.toml", "README.md", "relay", "gateway"}
    # Those paths hold the whole package, and no key or certificate.
    for name in copied:
        path = ROOT / name
        assert path.exists(), name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            assert file.suffix not in (".key", ".pem", ".crt", ".p12"), file
    ignore = (DEPLOY / "container" / "Containerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][0] == "*"
    assert "**/*.key" in ignore


def test_container_readme_documents_a_read_only_gateway() -> None:
    text = (DEPLOY / "README.md").read_text() + CONTAINERFILE.read_text()
    assert "--read-only" in text
    assert "/etc/relay:/etc/relay:ro" in text


# --------------------------------------------------------------------------- kubernetes

K8S = DEPLOY / "kubernetes"


def load_kustomization(name: str) -> list[dict[str, Any]]:
    """Every object that `kubectl apply -k deploy/kubernetes/<name>` applies."""
    directory = K8S / name
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, "every manifest is listed, every listed one exists"
    docs: list[dict[str, Any]] = []
    for resource in listed:
        docs.extend(d for d in yaml.safe_load_all((directory / resource).read_text()) if d)
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def configmap_config(docs: list[dict[str, Any]], role: str, tmp: Path) -> Any:
    configmap = only(docs, "ConfigMap")
    return load_role_config(role, configmap["data"][f"{role}.yaml"], tmp)


def check_pod_hardening(pod: dict[str, Any]) -> dict[str, Any]:
    """The restricted profile, on pod and container; returns the single container."""
    assert pod["automountServiceAccountToken"] is False
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "add" not in sc["capabilities"]
    return dict(container)


def port_of(container: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def check_names_and_selectors(docs: list[dict[str, Any]], namespace: str) -> None:
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
        assert doc["kind"] != "Secret", "no Secret (no key) is committed"
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        for doc in docs:
            spec = doc.get("spec", {})
            if doc["kind"] == "Service":
                chosen = spec["selector"]
            elif doc["kind"] == "PodDisruptionBudget":
                chosen = spec["selector"]["matchLabels"]
            elif doc["kind"] == "NetworkPolicy":
                chosen = spec["podSelector"]["matchLabels"]
            else:
                continue
            assert chosen.items() <= labels.items(), doc["metadata"]["name"]


def test_gateway_manifests(tmp_path: Path) -> None:
    docs = load_kustomization("gateway")
    check_names_and_selectors(docs, "relay-dmz")
    config = configmap_config(docs, "gateway", tmp_path)
    deployment = only(docs, "Deployment", "relay-gateway")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_grace
    container = check_pod_hardening(pod)
    assert "lifecycle" not in container, "SIGTERM drains; no preStop hook"
    assert container["args"] == ["gateway", "--config", "/etc/relay/config/gateway.yaml"]
    metrics_port = port_of(container, "metrics")
    assert metrics_port == config.metrics_listen.port
    assert port_of(container, "tunnel") == config.listen.port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # No volume but the config and the certificates, both read-only.
    assert {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]} == {
        "/etc/relay/config": True,
        "/etc/relay/tls": True,
    }
    sources = {next(k for k in v if k != "name") for v in pod["volumes"]}
    assert sources == {"configMap", "secret"}
    secret = next(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v)
    assert secret == "relay-gateway-tls"
    assert config.tls.cert.is_relative_to(tmp_path / "etc/relay/tls")

    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    headless = services["relay-gateway-agents"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is False
    devices = services["relay-gateway"]
    assert devices["type"] == "LoadBalancer"
    assert devices["externalTrafficPolicy"] == "Local"
    for spec in (headless, devices):
        assert [p["targetPort"] for p in spec["ports"]] == ["tunnel"]

    assert only(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1

    policy = only(docs, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    tunnel_rule, metrics_rule = policy["ingress"]
    assert "from" not in tunnel_rule  # from anywhere
    assert [p["port"] for p in tunnel_rule["ports"]] == [config.listen.port]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert [p["port"] for p in metrics_rule["ports"]] == [metrics_port]
    [dns] = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}


def test_agent_manifests(tmp_path: Path) -> None:
    docs = load_kustomization("agent")
    check_names_and_selectors(docs, "relay")
    config = configmap_config(docs, "agent", tmp_path)
    deployment = only(docs, "Deployment", "relay-agent")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_grace
    container = check_pod_hardening(pod)
    assert container["args"] == ["agent", "--config", "/etc/relay/config/agent.yaml"]
    assert port_of(container, "metrics") == config.metrics_listen.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    claim = next(v for v in pod["volumes"] if v["name"] == mounts["state"]["name"])
    pvc = only(docs, "PersistentVolumeClaim")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert config.state_dir == tmp_path / mounts["state"]["mountPath"].lstrip("/")
    assert mounts["tls"]["readOnly"] is True and mounts["config"]["readOnly"] is True
    policy = only(docs, "NetworkPolicy")["spec"]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert config.pacs is not None
    assert {53, config.pacs.port, *(g.port for g in config.gateways)} == egress_ports


@pytest.mark.interop
@pytest.mark.parametrize("name", ["gateway", "agent"])
def test_kustomize_builds(name: str) -> None:
    require_tools("kubectl")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert "Deployment" in kinds


def kustomize(name: str) -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/kubernetes/<name>` renders."""
    require_tools("kubectl")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.interop
@pytest.mark.parametrize(("name", "job"), [("gateway", "relay-gateway"), ("agent", "relay-agent")])
def test_prometheus_finds_pods_that_are_not_ready(name: str, job: str) -> None:
    """A pod failing /readyz (agent: PACS down) must stay a scrape target, or its `up`
    vanishes and the `up == 0` alerts never fire: the Service that Prometheus resolves
    publishes not-ready addresses, selects the role's pods and leads to the metrics port."""
    docs = kustomize(name)
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    [scrape] = [j for j in config["scrape_configs"] if j["job_name"] == job]
    [dns] = scrape["dns_sd_configs"]
    [fqdn] = dns["names"]
    service_name, namespace, *_ = fqdn.split(".")
    service = only(docs, "Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    [port] = spec["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == dns["port"]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()


@pytest.mark.interop
def test_agents_still_resolve_only_ready_gateways() -> None:
    """The agents' Service must keep leaving out a draining gateway."""
    service = only(kustomize("gateway"), "Service", "relay-gateway-agents")
    assert service["spec"]["publishNotReadyAddresses"] is False


def test_kustomize_check_fails_in_ci_without_kubectl(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI must install kubectl: its absence fails the check there instead of skipping it."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(OUTCOMES, match="kubectl") as outcome:
        test_kustomize_builds("gateway")
    assert outcome.type is pytest.fail.Exception  # a skip would escape CI's rule


# --------------------------------------------------------------------------- haproxy

HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"


def haproxy_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def test_haproxy_passes_tls_through() -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    assert "mode tcp" in sections["defaults"]
    assert not any(line.startswith("mode http") for lines in sections.values() for line in lines)
    for lines in sections.values():
        for line in lines:
            if line.startswith(("bind ", "server ", "default-server ")):
                words = line.split()
                assert "ssl" not in words and "crt" not in words, line
    [backend] = [lines for name, lines in sections.items() if name.startswith("backend ")]
    assert any(line in ("balance leastconn", "balance source") for line in backend)
    assert "option httpchk" in backend
    assert any("/readyz" in line for line in backend if line.startswith("http-check send"))
    servers = [line.split() for line in backend if line.startswith("server ")]
    assert len(servers) == 2
    for server in servers:
        assert server[2].startswith(f"{HOST}:")
        assert "check" in server and "port" in server


def _haproxy_for_test(tmp: Path, front: int, gateways: list[Gateway]) -> Path:
    """The example, on free ports, without chroot, user switch or syslog (not root here)."""
    text = HAPROXY_CFG.read_text()
    mapping = {
        "bind 127.0.0.1:8443": f"bind {HOST}:{front}",
        "127.0.0.1:18443 check port 19101": f"{HOST}:{gateways[0].port} check port "
        f"{gateways[0].metrics_port}",
        "127.0.0.1:28443 check port 29101": f"{HOST}:{gateways[1].port} check port "
        f"{gateways[1].metrics_port}",
    }
    for old, new in mapping.items():
        assert old in text, old
        text = text.replace(old, new)
    lines = []
    for line in text.splitlines():
        word = line.split()[0] if line.split() else ""
        if line.startswith("    ") and word in ("chroot", "user", "group", "stats", "log"):
            continue
        lines.append(line)
        if line.startswith("global"):
            lines.append(f"    stats socket {tmp}/haproxy.sock mode 600 level admin")
    path = tmp / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def server_states(sock_path: Path) -> dict[str, tuple[str, str]]:
    """{server: (status, check status)} of the backend, from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = data.decode().splitlines()
    header = rows[0].lstrip("# ").split(",")
    states = {}
    for row in rows[1:]:
        record = dict(zip(header, row.split(","), strict=False))
        if record.get("pxname") == "relay_gateways" and record.get("svname", "").startswith("gw"):
            states[record["svname"]] = (record["status"], record["check_status"])
    return states


def device_handshake(port: int, pki: SitePki) -> tuple[str | None, str]:
    """A device's TLS handshake on `port`: (ALPN chosen, peer URI SAN)."""
    device = pki.device("ws1")
    ctx = tls.client_context(device.cert, device.key, pki.ca, wire.ALPN_DEVICE)
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as conn,
    ):
        cert = conn.getpeercert()
        assert cert is not None
        names = cast(tuple[tuple[str, str], ...], cert.get("subjectAltName", ()))
        uris = [value for kind, value in names if kind == "URI"]
        return conn.selected_alpn_protocol(), uris[0]


@pytest.mark.interop
def test_haproxy_config_is_valid() -> None:
    require_tools("haproxy")
    out = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.interop
def test_haproxy_example_in_front_of_two_real_gateways(tmp_path: Path, gateways: Gateways) -> None:
    """TLS reaches the gateways untouched, and /readyz health checks follow them."""
    require_tools("haproxy")
    both = [gateways.start(), gateways.start()]
    reserved = reserve()  # HAProxy binds it (SO_REUSEADDR); kept for the whole test
    front = reserved.getsockname()[1]
    config = _haproxy_for_test(tmp_path, front, both)
    sock = tmp_path / "haproxy.sock"
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            f"haproxy stats socket ({log})",
            lambda: sock.exists() or haproxy.poll() is not None,
        )
        assert haproxy.poll() is None, log.read_text()

        def both_checked() -> bool:
            return server_states(sock) == {"gw1": ("UP", "L7OK"), "gw2": ("UP", "L7OK")}

        wait_for("both gateways UP by their /readyz", both_checked)
        # The device's handshake completes with the gateway's own certificate, verified
        # against the site CA, and its ALPN: HAProxy terminated nothing.
        pki = gateways.pki
        alpn, uri = device_handshake(front, pki)
        assert alpn == wire.ALPN_DEVICE
        assert uri.startswith(f"spiffe://{pki.trust_domain}/gateway/")

        assert both[0].stop() == 0  # drains (no links) and exits

        def gw1_down() -> bool:
            states = server_states(sock)
            return states["gw1"][0] == "DOWN" and states["gw2"] == ("UP", "L7OK")

        wait_for("gw1 marked DOWN", gw1_down)
        for _ in range(3):  # every new device goes to the gateway left
            assert device_handshake(front, pki)[0] == wire.ALPN_DEVICE
    finally:
        haproxy.terminate()
        try:
            haproxy.wait(WAIT)
        except subprocess.TimeoutExpired:
            haproxy.kill()
            haproxy.wait(WAIT)
        reserved.close()


# --------------------------------------------------------------------------- prometheus

PROMETHEUS = DEPLOY / "prometheus"
REQUIRED_ALERTS = {
    "RelayGatewayDown",
    "RelayGatewayTargetMissing",
    "RelayAgentTargetMissing",
    "RelaySiteNoAgentLink",
    "RelayCertificateExpiringSoon",
    "RelayRefusalsSpiking",
    "RelayDicomFailureRatioHigh",
}


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_cover_the_design_and_use_known_metrics() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = metric_names(rule["expr"])
        assert used and used <= ALLOWED_METRICS, (rule["alert"], used - ALLOWED_METRICS)


def test_scrape_configs_name_the_jobs_the_rules_use() -> None:
    jobs_in_rules = set(re.findall(r'job=~?"([^"]+)"', (PROMETHEUS / "alerts.yml").read_text()))
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        config = yaml.safe_load((PROMETHEUS / name).read_text())
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        assert jobs_in_rules <= jobs | {"relay-workstation"}, name
        assert config["rule_files"] == ["alerts.yml"]


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    require_tools("promtool")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


@pytest.mark.interop
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


@pytest.mark.interop
@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_promtool_check_config(name: str) -> None:
    out = promtool("check", "config", name)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.interop
def test_promtool_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert tested >= REQUIRED_ALERTS


@pytest.mark.interop
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('up{job="relay-gateway"} == 0', 'up{job="relay-gateway"} == 2'),  # never fires
        # what the Kubernetes discovery cannot see: no target is no `up`, not `up == 0`
        ('absent(up{job="relay-agent"})', 'up{job="relay-agent"} == 0'),
        ('absent(up{job="relay-gateway"})', 'up{job="relay-gateway"} == 0'),
        ("< 7 * 86400", "< 1 * 86400"),  # fires too late
        ('status!~"success|warning|cancel"', 'status!~"success"'),  # counts warnings
    ],
)
def test_promtool_rule_unit_tests_catch_a_broken_rule(old: str, new: str, tmp_path: Path) -> None:
    """The unit tests can fail: each mutation of a rule is caught."""
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


# --------------------------------------------------------------------------- grafana


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "relay-dashboard.json").read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(data: dict[str, Any]) -> list[str]:
    exprs = [
        target["expr"]
        for panel in all_panels(data["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in data["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            assert match, text
            exprs.append(match.group(1))
    return exprs


def test_dashboard_panels_are_well_formed() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    panels = list(all_panels(data["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target["refId"]


def test_dashboard_uses_only_known_metrics() -> None:
    for expr in dashboard_exprs(dashboard()):
        used = metric_names(expr)
        assert used, expr
        assert used <= ALLOWED_METRICS, (expr, used - ALLOWED_METRICS)


def test_dashboard_shows_what_operations_needs() -> None:
    exprs = dashboard_exprs(dashboard())
    used = set().union(*(metric_names(e) for e in exprs))
    assert used >= {
        "relay_links",
        "relay_streams_open",
        "relay_streams_total",
        "relay_bytes_total",
        "relay_refusals_total",
        "relay_handshakes_total",
        "relay_dicom_operations_total",
        "relay_dicom_operation_duration_seconds_bucket",
        "relay_dicom_instances_total",
        "relay_certificate_expiry_timestamp_seconds",
    }
    joined = "\n".join(exprs)
    assert "by (reason)" in joined
    assert re.search(r"by \([^)]*stage[^)]*\)", joined)
    assert re.search(r"by \([^)]*site[^)]*\) \(relay_links", joined)
    assert "histogram_quantile(" in joined


# --------------------------------------------------------------------------- README tables

README = (ROOT / "README.md").read_text()


def _exported(families: Iterable[Metric]) -> set[str]:
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def test_readme_gateway_table_names_every_gateway_metric() -> None:
    """README's gateway table lists each metric a gateway exports."""
    table = README[
        README.index("Gateway metrics (") : README.index("The agent and the workstation export")
    ]
    missing = {n for n in _exported(GatewayMetrics().registry.collect()) if f"`{n}`" not in table}
    assert not missing, missing


def test_readme_lists_the_agents_pixel_codec_metrics() -> None:
    """Each family of relay.agent.codec_metrics (fallbacks only exist for a pixel codec)."""
    from relay.agent.codec_metrics import PixelCodecMetrics
    from relay.dicom.encoder import CodecTally

    collector = PixelCodecMetrics(lambda: {"jpegls": CodecTally()})
    table = README[README.index("The agent and the workstation export") :]
    missing = {n for n in _exported(collector.collect()) if f"`{n}`" not in table}
    assert not missing, missing


def test_readme_lists_the_agents_syslog_metrics() -> None:
    """Each family of relay.agent.syslog.SyslogMetrics (an agent with `audit.syslog`)."""
    import ssl

    from relay.agent.syslog import SyslogMetrics, SyslogSender
    from relay.ops.config import Address

    sender = SyslogSender(Address("127.0.0.1", 6514), ssl.create_default_context())
    table = README[README.index("The agent and the workstation export") :]
    missing = {n for n in _exported(SyslogMetrics(sender).collect()) if f"`{n}`" not in table}
    assert not missing, missing
