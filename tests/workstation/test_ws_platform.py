"""`relay workstation` as a process, on what every platform has: Ctrl-C / Ctrl-Break,
`relay workstation reload|stop|status` over the control endpoint, the device key's
protection, the state directory. Gateway and agent run in this process; the workstation
and every command are real `python -m relay.cli` processes (in the portable lane they
inherit its sitecustomize: no uvloop, no SIGHUP, no loop signal handlers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.agent.service import run_agent
from relay.ops import control, privatefiles
from relay.workstation.config import default_state_dir, load_workstation_config, user_data_dir
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_service,
    write_readable_by_others,
)
from tests.pki_helpers import HOST, make_pki

ROOT = Path(__file__).resolve().parents[2]
WINDOWS = sys.platform == "win32"
PROCESS_WAIT = 30.0


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m relay.cli ARGS`, without blocking the loop that runs gateway and agent."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", *args, cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), PROCESS_WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Site:
    tmp: Path
    gateway_port: int
    identity: Path

    def write_config(self, name: str = "ws.yaml", state: str = "state", **extra: str) -> Path:
        lines = {
            "gateway": f"{HOST}:{self.gateway_port}",
            "identity_dir": str(self.identity),
            "state_dir": state,
            "reconnect": "{initial: 0.05s, max: 0.5s}",
            "drain_grace": "1s",
            **extra,
        }
        path = self.tmp / name
        path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
        return path


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        stop = asyncio.Event()
        config = agent_config(pki, tmp_path, [gw.port], {"echo": (echo.port, False)})
        agent = asyncio.create_task(run_agent(config, stop=stop, handlers={}, handle_signals=False))
        try:
            yield Site(tmp_path, gw.port, identity)
        finally:
            stop.set()
            await asyncio.wait_for(agent, WAIT)


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    log: Path

    def messages(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line).get("msg", "") for line in lines if line.startswith("{")]

    def interrupt(self) -> None:
        """Ctrl-C (Ctrl-Break on Windows, where a console group gets it)."""
        if WINDOWS:
            self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined,unused-ignore]
        else:
            self.proc.send_signal(signal.SIGINT)


@contextlib.asynccontextmanager
async def workstation(config: Path) -> AsyncIterator[Running]:
    log = config.with_suffix(".log")
    flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay.cli", "workstation", "--config", str(config),
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, creationflags=flags,
        )  # fmt: skip
    try:
        yield Running(proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until_ready(config: Path, running: Running) -> dict[str, Any]:
    """`relay workstation status --json` until the link is up (bounded)."""
    async with asyncio.timeout(PROCESS_WAIT):
        while True:
            assert running.proc.returncode is None, running.log.read_text()
            code, out, _ = await cli("workstation", "status", "--json", "--config", str(config))
            if code == 0 and json.loads(out)["ready"]:
                answer: dict[str, Any] = json.loads(out)
                return answer
            await asyncio.sleep(0.1)


async def test_reload_status_and_stop_over_the_control_endpoint(site: Site) -> None:
    config = site.write_config()
    async with workstation(config) as ws:
        status = await until_ready(config, ws)
        assert status["pid"] == ws.proc.pid
        assert status["identity"].endswith("/device/main/ws1")
        state = site.tmp / "state"
        privatefiles.check_private(state / control.CONTROL_FILE, "control endpoint file")

        site.write_config(log_level="debug", drain_grace="2s")
        code, out, err = await cli("workstation", "reload", "--config", str(config))
        assert (code, out.strip(), err) == (0, "reloaded configuration and certificates", "")

        site.write_config(forward='{"127.0.0.1:0": echo}')
        code, out, _ = await cli("workstation", "reload", "--config", str(config))
        assert code == 0 and "these need a restart: forward" in out

        site.write_config(log_level="LOUD")
        code, out, err = await cli("workstation", "reload", "--config", str(config))
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "log_level" in err and "Traceback" not in err

        code, out, _ = await cli("workstation", "stop", "--config", str(config))
        assert code == 0 and "stopping" in out
        assert await asyncio.wait_for(ws.proc.wait(), PROCESS_WAIT) == 0
        messages = ws.messages()
        assert messages.count("reloaded configuration and certificates") == 2
        assert "workstation stopped" in messages
        assert not (state / control.CONTROL_FILE).exists()
        code, _, err = await cli("workstation", "status", "--config", str(config))
        assert code == 2 and "nothing is running with the state directory" in err


async def test_ctrl_c_drains_and_exits_0(site: Site) -> None:
    config = site.write_config()
    async with workstation(config) as ws:
        await until_ready(config, ws)
        ws.interrupt()
        assert await asyncio.wait_for(ws.proc.wait(), PROCESS_WAIT) == 0, ws.log.read_text()
        messages = ws.messages()
        assert "workstation draining" in messages and "workstation stopped" in messages
        assert "Traceback" not in ws.log.read_text()


async def test_a_second_workstation_on_the_same_state_dir_is_refused(site: Site) -> None:
    config = site.write_config()
    async with workstation(config) as first:
        await until_ready(config, first)
        second = site.write_config("second.yaml")
        code, _, err = await cli("workstation", "--config", str(second))
        assert code == 2
        assert f"a workstation (pid {first.proc.pid}) already runs with the state directory" in err
        await until_ready(config, first)  # still there, still answering


async def test_a_device_key_others_may_read_stops_start_up(site: Site) -> None:
    key = site.identity / "device.key"
    data = key.read_bytes()
    key.unlink()
    write_readable_by_others(key, data)
    code, out, err = await cli("workstation", "--config", str(site.write_config()))
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert f"the device key {key} is not private" in err
    assert privatefiles.fix_command(key) in err


def test_the_default_state_dir_is_per_config_in_the_users_data_dir(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "ws.yaml", tmp_path / "b" / "ws.yaml"
    assert default_state_dir(one).parent == user_data_dir() / "workstation"
    assert default_state_dir(one).name.startswith("ws-")
    assert default_state_dir(one) != default_state_dir(two)  # two sites on one PC
    assert default_state_dir(one) == default_state_dir(tmp_path / "b" / ".." / "a" / "ws.yaml")


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_DATA_HOME is the Linux convention")
async def test_without_state_dir_the_workstation_uses_the_users_data_dir(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = site.tmp / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    path = site.tmp / "bare.yaml"
    path.write_text(f"gateway: {HOST}:{site.gateway_port}\nidentity_dir: {site.identity}\n")
    expected = data / "dmz-relay" / "workstation" / default_state_dir(path).name
    assert load_workstation_config(path).state_dir == expected
    env = {**os.environ, "XDG_DATA_HOME": str(data)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "workstation", "--config", str(path),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(PROCESS_WAIT):
            while True:
                code, out, _ = await cli(
                    "workstation", "status", "--json", "--config", str(path), env=env
                )
                if code == 0 and json.loads(out)["ready"]:
                    break
                await asyncio.sleep(0.1)
        privatefiles.check_private(expected, "state directory")  # we made it: private
        assert (expected / control.CONTROL_FILE).exists()
        assert (await cli("workstation", "stop", "--config", str(path), env=env))[0] == 0
        assert await asyncio.wait_for(proc.wait(), PROCESS_WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_reload_says_when_the_next_start_would_refuse_the_identity_dir(
    site: Site,
) -> None:
    """A new identity_dir with a key others may read: "reloaded; these need a restart"
    and status 0 told IT to restart, and the restart then refused. Now: status 1 and
    the reason the next start will fail, while what a reload applies still applies."""
    import shutil

    config = site.write_config()
    async with workstation(config) as ws:
        await until_ready(config, ws)
        copy = site.tmp / "identity-copy"
        shutil.copytree(site.identity, copy)
        key = copy / "device.key"
        data = key.read_bytes()
        key.unlink()
        write_readable_by_others(key, data)
        site.write_config(identity_dir=str(copy), drain_grace="2s")
        code, out, err = await cli("workstation", "reload", "--config", str(config))
        assert code == 1, err
        assert "these need a restart: identity_dir" in out
        assert err.count("\n") == 1, err
        assert "the next start will fail" in err and f"the device key {key} is not private" in err
        assert "Traceback" not in err
        await until_ready(config, ws)  # still running on the old identity
        code, _, _ = await cli("workstation", "stop", "--config", str(config))
        assert code == 0
        assert await asyncio.wait_for(ws.proc.wait(), PROCESS_WAIT) == 0
        assert any("the next start will fail" in m for m in ws.messages())
    code, _, err = await cli("workstation", "--config", str(config))
    assert code == 2 and f"the device key {key} is not private" in err
