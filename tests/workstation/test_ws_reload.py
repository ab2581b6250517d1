"""A workstation's reload refused for its identity files says what a start says: the
config file and `identity_dir`, then what is wrong; a renewed certificate of the same
device reloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.ops.config import ConfigError
from relay.workstation.config import load_workstation_config
from relay.workstation.ownidentity import check_identity
from relay.workstation.service import Workstation
from tests.ends_helpers import device_identity_dir
from tests.pki_helpers import HOST, make_pki


def _error_line(caplog: pytest.LogCaptureFixture) -> str:
    (line,) = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
    return str(line.__dict__["error"])


async def test_identity_errors_on_reload_name_the_key_as_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path / "pki")
    other_ca = make_pki(tmp_path / "other-pki")
    identity = device_identity_dir(pki, tmp_path)
    config_path = tmp_path / "workstation.yaml"
    config_path.write_text(f"gateway: '{HOST}:1'\nidentity_dir: {identity}\n")
    ws = Workstation(load_workstation_config(config_path))
    cert = identity / "device.crt"

    foreign = other_ca.device("ws1")  # same name, another CA
    cert.write_bytes(foreign.cert.read_bytes())
    (identity / "device.key").write_bytes(foreign.key.read_bytes())
    with pytest.raises(ConfigError) as at_start:
        check_identity(load_workstation_config(config_path))
    with caplog.at_level("ERROR", logger="relay.workstation.service"):
        assert not (await ws.reload()).ok
    said = _error_line(caplog)
    assert said == str(at_start.value)
    assert said.startswith(f"{config_path}: identity_dir: {cert}: not signed by a CA in")

    other = pki.device("someone-else")  # this CA, another device: only a restart may
    cert.write_bytes(other.cert.read_bytes())
    (identity / "device.key").write_bytes(other.key.read_bytes())
    caplog.clear()
    with caplog.at_level("ERROR", logger="relay.workstation.service"):
        assert not (await ws.reload()).ok
    said = _error_line(caplog)
    assert said.startswith(f"{config_path}: identity_dir: {cert}: is for ")
    assert "a reload keeps the name 'ws1'" in said

    renewed = pki.device("ws1")
    cert.write_bytes(renewed.cert.read_bytes())
    (identity / "device.key").write_bytes(renewed.key.read_bytes())
    assert (await ws.reload()).ok
    assert ws.reloads.error == 2 and ws.reloads.ok == 1


async def test_local_access_changes_at_reload_for_every_listener(tmp_path: Path) -> None:
    """The one AccountGate the node, DICOMweb and the forwards share follows a reload."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    config_path = tmp_path / "workstation.yaml"
    base = f"gateway: '{HOST}:1'\nidentity_dir: {identity}\n"
    config_path.write_text(base)
    ws = Workstation(load_workstation_config(config_path))
    assert ws.accounts.anyone and ws.forwarder.accounts is ws.accounts
    config_path.write_text(base + "local_access: same-user\n")
    assert (await ws.reload()).ok
    assert ws.accounts.access == "same-user" and not ws.forwarder.accounts.anyone
    assert "local_access" not in ws.restart_needed
