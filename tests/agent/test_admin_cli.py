"""`relay token create` and `relay device list|revoke` as functions (the CLI wires them)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from relay.agent.admin_cli import device_list, device_revoke, token_create
from relay.agent.audit import AUDIT_FILE, read_events
from relay.agent.registry import REGISTRY_FILE, DeviceRegistry
from relay.ops.config import Address
from relay.trust import pki
from relay.trust.codes import parse_code
from tests.pki_helpers import SitePki, make_pki

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def write_config(tmp: Path, site: SitePki, *, with_pki: bool = True) -> Path:
    d = site.directory
    lines = [
        "site: main",
        "gateways: [127.0.0.1:8443, 127.0.0.1:9443]",
        f"tls: {{cert: {d}/agent.crt, key: {d}/agent.key, ca: {d}/ca.crt}}",
        "state_dir: state/",
    ]
    if with_pki:
        lines.append(f"pki: {{ca_cert: {d}/ca.crt, ca_key: {d}/ca.key}}")
    path = tmp / "agent.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, SitePki]:
    site = make_pki(tmp_path / "pki")
    return write_config(tmp_path, site), site


def test_token_create_prints_the_code_alone(
    setup: tuple[Path, SitePki], capsys: pytest.CaptureFixture[str]
) -> None:
    config, site = setup
    assert token_create(config, "ws1", "2h", now=lambda: T0) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    code = parse_code(out.strip())
    assert code.gateway == Address("127.0.0.1", 8443)  # the first `gateways` entry
    assert code.ca_fingerprint == pki.ca_fingerprint(site.ca_cert)
    assert (code.site, code.device) == ("main", "ws1")
    assert "ws1" in err and "2030-01-01T14:00:00" in err
    with DeviceRegistry(config.parent / "state" / REGISTRY_FILE, site="main") as registry:
        assert registry.redeem_token(code.token_id, code.secret, "ws1", T0).ok
    (event,) = read_events(config.parent / "state" / AUDIT_FILE)
    assert event["kind"] == "token_created"
    assert event["ActiveParticipant"][0]["UserID"].startswith("cli:")
    assert event["AuditSourceIdentification"]["AuditSourceID"] == (
        "spiffe://hospital.test/agent/main"
    )


def test_the_cli_rotates_the_audit_trail_at_the_configured_size(
    setup: tuple[Path, SitePki],
) -> None:
    """The CLI appends to the agent's security set: it must rotate it at the config's
    `audit.max_size`, not at the default 10 MiB (it did, whatever the config said)."""
    config, _ = setup
    with config.open("a") as f:
        f.write("audit: {max_size: 64KiB, keep: 2}\n")
    state = config.parent / "state"
    state.mkdir(mode=0o700)
    filler = json.dumps({"kind": "it_login", "n": "x" * 900})
    (state / AUDIT_FILE).write_text((filler + "\n") * 70)  # ~64 KiB: the next event rotates
    assert token_create(config, "ws1", "2h", now=lambda: T0) == 0
    assert (state / f"{AUDIT_FILE}.1").stat().st_size > 60_000
    assert [e["kind"] for e in read_events(state / AUDIT_FILE)][-1] == "token_created"
    assert (state / AUDIT_FILE).stat().st_size < 4096


def test_gateway_override(setup: tuple[Path, SitePki]) -> None:
    config, _ = setup
    out = io.StringIO()
    assert token_create(config, "ws1", None, "dmz.example.org:443", out=out) == 0
    assert parse_code(out.getvalue().strip()).gateway == Address("dmz.example.org", 443)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bad name", "1h", None), "device name"),
        (("ws1", "forever", None), "duration"),
        (("ws1", "90d", None), "lifetime"),
        (("ws1", "1h", "no-port"), "port"),
    ],
)
def test_token_create_errors(
    setup: tuple[Path, SitePki],
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, str, str | None],
    message: str,
) -> None:
    config, _ = setup
    assert token_create(config, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay token create: ") and message in err and err.count("\n") == 1


def test_token_create_needs_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, make_pki(tmp_path / "pki"), with_pki=False)
    assert token_create(config, "ws1") == 2
    assert "pki: required" in capsys.readouterr().err


def test_bad_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("site: main\nsurprise: 1\n")
    assert device_list(config) == 2
    assert str(config) in capsys.readouterr().err


def test_list_and_revoke(setup: tuple[Path, SitePki], capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = setup
    out = io.StringIO()
    assert device_list(config, out=out) == 0
    assert "no devices yet" in out.getvalue()
    with DeviceRegistry(config.parent / "state" / REGISTRY_FILE, site="main") as registry:
        registry.record_certificate("ws1", 0xBEEF, T0, T0 + timedelta(days=30), T0)
        registry.touch("ws1", T0 + timedelta(hours=1))
        registry.record_certificate("ws2", 0xCAFE, T0, T0 + timedelta(days=1), T0)
    out = io.StringIO()
    assert device_list(config, out=out, now=lambda: T0 + timedelta(days=2)) == 0
    table = out.getvalue().splitlines()
    assert table[0].split() == [
        "DEVICE",
        "USER",
        "STATUS",
        "LAST",
        "SEEN",
        "ENROLLED",
        "CERT",
        "EXPIRES",
        "SERIAL",
    ]
    assert table[1].split()[:3] == ["ws1", "-", "active"] and "2030-01-01 13:00" in table[1]
    assert table[2].split()[:3] == ["ws2", "-", "expired"]

    out = io.StringIO()
    assert device_revoke(config, "ws1", out=out) == 0
    assert "revoked spiffe://hospital.test/device/main/ws1" in out.getvalue()
    assert device_revoke(config, "ws1", out=io.StringIO()) == 1
    assert device_revoke(config, "typo", out=io.StringIO()) == 2  # a typo is no success
    assert "no device 'typo' in the registry" in capsys.readouterr().err
    assert device_revoke(config, "typo", force=True, out=io.StringIO()) == 0
    assert "not in the registry" in capsys.readouterr().err

    out = io.StringIO()
    assert device_list(config, as_json=True, out=out, now=lambda: T0) == 0
    rows = {r["name"]: r for r in json.loads(out.getvalue())}
    assert rows["ws1"]["status"] == "revoked" and rows["ws1"]["serial"] == "beef"
    assert rows["ws1"]["last_seen"] == "2030-01-01T13:00:00+00:00"
    assert rows["typo"]["status"] == "revoked"
    kinds = [e["kind"] for e in read_events(config.parent / "state" / AUDIT_FILE)]
    assert kinds == ["revocation", "revocation"]
    # No new code for a revoked name.
    assert token_create(config, "ws1", out=io.StringIO()) == 2
    assert "revoked" in capsys.readouterr().err


def test_revoke_of_an_unknown_name_from_the_cli(setup: tuple[Path, SitePki]) -> None:
    """`relay device revoke` in a real process: an unknown name is an error (status 2, one
    line, nothing revoked) unless --force."""
    config, _ = setup

    def revoke(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay.cli", "device", "revoke", "wsx", "--config",
             str(config), *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = revoke()
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no device 'wsx'" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    with DeviceRegistry(config.parent / "state" / REGISTRY_FILE, site="main") as registry:
        assert not registry.is_revoked("wsx")
    done = revoke("--force")
    assert done.returncode == 0, done.stderr
    assert "revoked spiffe://hospital.test/device/main/wsx" in done.stdout
    with DeviceRegistry(config.parent / "state" / REGISTRY_FILE, site="main") as registry:
        assert registry.is_revoked("wsx")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown state_dir"
)
@pytest.mark.parametrize(
    "command",
    [
        ["token", "create", "--device", "ws9"],
        ["device", "revoke", "ws9", "--force"],
        ["device", "list"],
    ],
)
def test_root_is_refused_in_the_agents_state_dir(
    setup: tuple[Path, SitePki], command: list[str]
) -> None:
    """Run as root beside a systemd agent (User=relay-agent), the commands would leave
    root-owned 0600 files that the agent cannot open: refused, one line, status 2, nothing
    created, and the line says whom to run it as."""
    config, _ = setup
    state = config.parent / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", *command, "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    owner = _user_name(65534)
    assert f"run this as {owner}" in done.stderr and f"runuser -u {owner}" in done.stderr
    assert list(state.iterdir()) == []


def _user_name(uid: int) -> str:
    import pwd  # POSIX: the only caller is skipped elsewhere

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
