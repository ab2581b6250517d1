"""A failed reload of the gateway (SIGHUP) says what a failed start says: the config file,
the `tls.*` key at fault and the path, and keeps the running configuration."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from gateway.lifecycle import reload
from gateway.service import tls_at_start
from relay.ops.config import ConfigError, TlsFiles
from tests.gateway.test_gateway_links import World, world
from tests.pki_helpers import make_pki

__all__ = ["world"]  # the fixture, shared with test_gateway_links


async def test_a_failed_reload_names_the_file_the_key_and_the_path_as_start_up_does(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = world.server.config
    gw, site = world.pki.gateway, world.pki
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    broken = {
        "tls.key": TlsFiles(gw.cert, site.agent.key, running.tls.ca),  # another one's key
        "tls.cert": TlsFiles(junk, gw.key, running.tls.ca),
        "tls.ca": TlsFiles(gw.cert, gw.key, junk),
    }
    for key, files in broken.items():
        config = dataclasses.replace(running, tls=files)
        with pytest.raises(ConfigError) as at_start:
            tls_at_start(config)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.lifecycle"):
            assert not await reload(world.server, lambda _, c=config: c)  # type: ignore[misc]
        (line,) = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
        said = line.__dict__["error"]
        assert said == str(at_start.value), key
        assert said.startswith(f"{running.path}: {key}: {junk if key != 'tls.key' else files.key}")
    # A CA of another trust domain: a reload refuses it (a start would take it).
    other = make_pki(tmp_path / "other", trust_domain="other.test")
    config = dataclasses.replace(
        running, tls=TlsFiles(other.gateway.cert, other.gateway.key, other.ca)
    )
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gateway.lifecycle"):
        assert not await reload(world.server, lambda _: config)
    assert caplog.records[-1].__dict__["error"].startswith(f"{running.path}: tls.ca: {other.ca}")
    assert world.server.config is running
    assert (
        world.server.metrics.registry.get_sample_value("relay_reloads_total", {"result": "error"})
        == len(broken) + 1
    )
