"""The workstation's single-instance check on its state directory (relay.workstation.control):
only an endpoint that proves it holds the secret of control.json is a running workstation."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
from aiohttp import web

from relay.ops import control, privatefiles
from relay.workstation import control as wscontrol

if TYPE_CHECKING:
    from relay.workstation.service import Workstation


async def status(body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "pid": 1234}


@pytest.fixture
async def stale_file_and_a_stranger(tmp_path: Path) -> AsyncIterator[Path]:
    """A workstation died and left control.json; another local user listens on its port."""
    srv = control.ControlServer(tmp_path, {"status": status})
    await srv.start()
    assert srv.port is not None
    saved = (tmp_path / control.CONTROL_FILE).read_bytes()
    await srv.stop()
    fd = privatefiles.create_private(tmp_path / control.CONTROL_FILE)
    os.write(fd, saved)
    os.close(fd)

    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pid": 4242})

    app = web.Application()
    app.router.add_post("/v1/{command}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", srv.port).start()
    yield tmp_path
    await runner.cleanup()


async def test_a_stranger_on_a_stale_endpoint_does_not_block_the_start(
    stale_file_and_a_stranger: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=wscontrol.__name__):
        await wscontrol._refuse_a_second_instance(stale_file_and_a_stranger)  # no refusal
    [record] = caplog.records
    assert "stale or foreign control endpoint" in record.getMessage()
    assert "cannot prove it holds the secret" in str(record.__dict__.get("why"))


async def test_a_workstation_that_proves_the_secret_already_runs(tmp_path: Path) -> None:
    srv = control.ControlServer(tmp_path, {"status": status})
    await srv.start()
    try:
        with pytest.raises(control.ControlError, match=r"\(pid 1234\) already runs"):
            await wscontrol._refuse_a_second_instance(tmp_path)
    finally:
        await srv.stop()


async def test_no_endpoint_file_says_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        await wscontrol._refuse_a_second_instance(tmp_path)
    assert caplog.records == []


async def test_two_workstations_started_at_the_same_instant_are_one(tmp_path: Path) -> None:
    """Neither has written control.json when the other probes: only the lock tells."""
    config = SimpleNamespace(state_dir=tmp_path, path=tmp_path / "ws.yaml")
    workstation = cast("Workstation", SimpleNamespace(config=config))
    entered = asyncio.Event()
    release = asyncio.Event()

    async def start() -> None:
        async with wscontrol.control_endpoint(workstation, release.set):
            entered.set()
            await release.wait()

    tasks = [asyncio.create_task(start()), asyncio.create_task(start())]
    done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    [refused] = [t.exception() for t in done]
    assert isinstance(refused, control.ControlError), refused
    assert "already runs with the state directory" in str(refused)
    await asyncio.wait_for(entered.wait(), 10)
    release.set()  # the one that runs stops
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    entered.clear()
    # the first one to leave lets the next start
    release.clear()
    task = asyncio.create_task(start())
    await asyncio.wait_for(entered.wait(), 10)
    release.set()
    await asyncio.wait_for(task, 10)
