"""`relay gateway|agent|workstation` refuse at start-up the certificates a reload refuses.

Before, only a reload checked the role's own certificate: a gateway started with an
agent's certificate answered /readyz 200 while every handshake failed, a workstation with
an expired certificate dialled forever. Each case here is a real process: exit 2, one
line naming the file and the key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.trust.identity import Identity
from relay.workstation.config import load_workstation_config
from relay.workstation.service import Workstation
from tests.ends_helpers import device_identity_dir
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.test_cli import assert_user_error, relay


def _gateway_config(tmp: Path, cert: Path, key: Path, ca: Path) -> Path:
    config = tmp / "gateway.yaml"
    config.write_text(f"listen: {HOST}:0\ntls: {{cert: {cert}, key: {key}, ca: {ca}}}\n")
    return config


def _agent_config(tmp: Path, pki: SitePki, cert: Path, key: Path, ca_pki: SitePki) -> Path:
    config = tmp / "agent.yaml"
    config.write_text(
        "site: main\n"
        f"gateways: ['{HOST}:1']\n"
        f"tls: {{cert: {cert}, key: {key}, ca: {pki.ca}}}\n"
        f"pki: {{ca_cert: {ca_pki.ca}, ca_key: {ca_pki.directory / 'ca.key'}}}\n"
        f"state_dir: {tmp / 'state'}\n"
    )
    return config


def _workstation_config(tmp: Path, identity: Path) -> Path:
    config = tmp / "workstation.yaml"
    config.write_text(
        f"gateway: {HOST}:1\nidentity_dir: {identity}\nstate_dir: {tmp / 'wsstate'}\n"
    )
    return config


def test_gateway_with_an_agent_certificate_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = _gateway_config(tmp_path, pki.agent.cert, pki.agent.key, pki.ca)
    done = relay("gateway", "--config", str(config))
    assert_user_error(done, f"{config}: tls.cert: {pki.agent.cert}: is for", "role 'gateway'")


def test_gateway_with_a_certificate_of_another_ca_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    config = _gateway_config(tmp_path, other.gateway.cert, other.gateway.key, pki.ca)
    done = relay("gateway", "--config", str(config))
    assert_user_error(done, f"{config}: tls.cert:", f"not signed by a CA in {pki.ca}")


def test_agent_with_a_device_certificate_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    device = pki.device("ws1")
    config = _agent_config(tmp_path, pki, device.cert, device.key, pki)
    done = relay("agent", "--config", str(config))
    assert_user_error(done, f"{config}: tls.cert:", "role 'agent'")


def test_agent_with_another_sites_agent_certificate_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other_site = pki.issue("east", Identity.agent(pki.trust_domain, "east"))
    config = _agent_config(tmp_path, pki, other_site.cert, other_site.key, pki)
    done = relay("agent", "--config", str(config))
    assert_user_error(done, f"{config}: tls.cert:", "site 'main'")


def test_agent_whose_pki_ca_is_not_in_tls_ca_does_not_start(tmp_path: Path) -> None:
    """Its codes would name a CA the agent does not trust: enrollment fails at the PC."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")  # same trust domain and site, another key
    config = _agent_config(tmp_path, pki, pki.agent.cert, pki.agent.key, other)
    done = relay("agent", "--config", str(config))
    assert_user_error(done, f"{config}: pki.ca_cert:", f"not one of the CAs of tls.ca ({pki.ca})")


def test_agent_whose_pki_key_is_not_its_ca_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "ca.crt").write_bytes(pki.ca.read_bytes())
    (tmp_path / "mixed" / "ca.key").write_bytes((other.directory / "ca.key").read_bytes())
    mixed = SitePki(tmp_path / "mixed", pki.trust_domain, pki.site, None, None)
    config = _agent_config(tmp_path, pki, pki.agent.cert, pki.agent.key, mixed)
    done = relay("agent", "--config", str(config))
    assert_user_error(done, f"{config}: pki.ca_key:", "does not match")


def _junk(tmp: Path) -> Path:
    junk = tmp / "junk.pem"
    junk.write_text("not PEM\n")
    return junk


@pytest.mark.parametrize("fault", ["mismatch", "ca"])
def test_gateway_tls_file_errors_name_the_key_and_the_path(tmp_path: Path, fault: str) -> None:
    """A key of another certificate, a CA bundle that does not load: the line names tls.key
    or tls.ca (it named no key, or tls.cert for a CA bundle). A key file that does not
    load: tests/net/test_tls.py (the same TlsConfigError.part)."""
    pki, junk = make_pki(tmp_path / "pki"), _junk(tmp_path)
    gw = pki.gateway
    cert, key, ca, expected = {
        "mismatch": (gw.cert, pki.agent.key, pki.ca, f"tls.key: {pki.agent.key} does not match"),
        "ca": (gw.cert, gw.key, junk, f"tls.ca: {junk}: "),
    }[fault]
    config = _gateway_config(tmp_path, cert, key, ca)
    assert_user_error(relay("gateway", "--config", str(config)), f"{config}: {expected}")


@pytest.mark.parametrize("fault", ["mismatch", "ca"])
def test_agent_tls_file_errors_name_the_key_and_the_path(tmp_path: Path, fault: str) -> None:
    pki, junk = make_pki(tmp_path / "pki"), _junk(tmp_path)
    if fault == "mismatch":
        config = _agent_config(tmp_path, pki, pki.agent.cert, pki.gateway.key, pki)
        expected = f"tls.key: {pki.gateway.key} does not match the certificate {pki.agent.cert}"
    else:
        config = _agent_config(tmp_path, pki, pki.agent.cert, pki.agent.key, pki)
        config.write_text(config.read_text().replace(f"ca: {pki.ca}}}", f"ca: {junk}}}"))
        expected = f"tls.ca: {junk}: "
    assert_user_error(relay("agent", "--config", str(config)), f"{config}: {expected}")


def test_agent_it_pages_key_that_does_not_match_names_it_pages_tls_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = _agent_config(tmp_path, pki, pki.agent.cert, pki.agent.key, pki)
    (tmp_path / "it-admins").write_text("")
    with config.open("a") as out:
        out.write(
            f"it_pages: {{listen: '{HOST}:0', admins_file: {tmp_path / 'it-admins'}, "
            f"tls: {{cert: {pki.gateway.cert}, key: {pki.agent.key}}}}}\n"
        )
    done = relay("agent", "--config", str(config))
    assert_user_error(
        done, f"{config}: it_pages.tls.key: {pki.agent.key} does not match the certificate"
    )


def test_workstation_key_that_does_not_load_names_it(tmp_path: Path) -> None:
    """identity_dir is the key; the line names device.key, not "device.crt / device.key"."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    (identity / "device.key").write_text("not PEM\n")
    config = _workstation_config(tmp_path, identity)
    done = relay("workstation", "--config", str(config))
    assert_user_error(
        done, f"{config}: identity_dir: {identity / 'device.key'}: cannot load the private key"
    )


def test_workstation_with_an_expired_certificate_says_enroll_again(tmp_path: Path) -> None:
    """It cannot renew once expired (the gateway refuses the link renewal rides on)."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    ended = datetime.now(UTC) - timedelta(hours=1)
    expired = pki.device("old", lifetime=timedelta(days=1), not_before=ended - timedelta(days=1))
    (identity / "device.crt").write_bytes(expired.cert.read_bytes())
    (identity / "device.key").write_bytes(expired.key.read_bytes())
    config = _workstation_config(tmp_path, identity)
    done = relay("workstation", "--config", str(config))
    assert_user_error(
        done,
        f"{config}: identity_dir: device certificate expired at ",
        f"enroll again: relay enroll CODE --dir {identity}",
    )


def test_workstation_with_a_ca_of_another_site_pki_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    identity = device_identity_dir(pki, tmp_path)
    (identity / "ca.crt").write_bytes(other.ca.read_bytes())
    config = _workstation_config(tmp_path, identity)
    done = relay("workstation", "--config", str(config))
    assert_user_error(done, f"{config}: identity_dir:", "not signed by a CA in")


def test_workstation_near_the_end_of_its_certificate_starts(tmp_path: Path) -> None:
    """Renewal needs the workstation running: a certificate close to expiry must start."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    start = datetime.now(UTC) - timedelta(days=1) + timedelta(minutes=5)
    near = pki.device("near", lifetime=timedelta(days=1), not_before=start)
    (identity / "device.crt").write_bytes(near.cert.read_bytes())
    (identity / "device.key").write_bytes(near.key.read_bytes())
    ws = Workstation(load_workstation_config(_workstation_config(tmp_path, identity)))
    assert ws.identity.name == "near"


def test_agent_move_listen_port_taken_names_file_and_key(tmp_path: Path) -> None:
    """The C-MOVE receiver's bind was the one listener not turned into a config error:
    a traceback and exit 1."""
    import socket

    pki = make_pki(tmp_path / "pki")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "agent.yaml"
        config.write_text(
            "site: main\n"
            f"gateways: ['{HOST}:1']\n"
            f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
            f"state_dir: {tmp_path / 'state'}\n"
            f"pacs: {{ae_title: PACS, host: {HOST}, port: 1, retrieve: move, "
            f"move_listen: '{HOST}:{port}'}}\n"
        )
        done = relay("agent", "--config", str(config))
    assert_user_error(done, f"{config}: pacs.move_listen: cannot listen on {HOST}:{port}")
