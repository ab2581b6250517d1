"""The workstation reloads off its event loop (Workstation.reloader, relay.ops.reloader):
while a SIGHUP's reload waits on a config that is a FIFO nobody has written yet, the
control endpoint still answers, and `relay workstation reload` answers with the outcome
of a reload that reads the file after it asked. A burst of SIGHUPs makes at most one
more reload; a stop during a held reload ends the run at once; a renewal that lands
during a reload keeps its newer identity.

The workstation runs in this process with its real signal handlers; the signals are
raised here. Where there is neither SIGHUP nor a FIFO (Windows, the portable lane), a
test hook holds the config's read and the reload comes over the control endpoint. On the
old code the SIGHUP handler read the FIFO on the loop: nothing else
ran until its deadline, and the reload failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.ops import control
from relay.workstation import service
from relay.workstation.config import WorkstationConfig, load_workstation_config
from relay.workstation.service import Workstation, run_workstation
from tests.ends_helpers import WAIT, device_identity_dir, wait_until
from tests.pki_helpers import HOST, make_pki
from tests.reload_helpers import HAS_FIFO, feed, held_reader_async, make_fifo

posix = pytest.mark.skipif(
    not HAS_FIFO or not hasattr(signal, "SIGHUP"), reason="SIGHUP and FIFOs are POSIX"
)


@dataclass
class Running:
    ws: Workstation
    stop: asyncio.Event
    task: asyncio.Task[int]
    config: Path
    text: str
    state: Path

    async def call(self, command: str) -> dict[str, Any]:
        return await control.call(self.state, command, timeout=WAIT)


@contextlib.asynccontextmanager
async def workstation_with_signals(tmp_path: Path) -> AsyncIterator[Running]:
    """A workstation with its SIGHUP handler and its control endpoint (no gateway: it
    keeps dialling, which a reload does not need)."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    state = tmp_path / "state"
    config = tmp_path / "ws.yaml"
    text = (
        f"gateway: '{HOST}:1'\nidentity_dir: {identity}\nstate_dir: {state}\n"
        "reconnect: {initial: 0.05s, max: 0.5s}\ndrain_grace: 1s\n"
    )
    config.write_text(text)
    stop = asyncio.Event()
    started: asyncio.Future[Workstation] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_workstation(
            load_workstation_config(config), stop=stop, started=started.set_result, with_dicom=False
        )
    )
    ws = await asyncio.wait_for(started, WAIT)
    try:
        yield Running(ws, stop, task, config, text, state)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@posix
async def test_the_endpoint_answers_while_a_reload_waits_and_reload_awaits_its_outcome(
    tmp_path: Path,
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)  # the reload is reading
        status = await running.call("status")  # answered meanwhile
        assert status["ok"] and status["pid"] == os.getpid()
        # Asked now, it answers for a reload that reads the file after it: the next one.
        asked = asyncio.ensure_future(running.call("reload"))
        await wait_until(lambda: running.ws.reloader.waiting)
        feed(writer, running.text)
        await wait_until(lambda: running.ws.reloads.ok == 1)  # and closed the FIFO
        assert not asked.done()
        feed(await held_reader_async(running.config), running.text.replace("1s\n", "3s\n"))
        answer = await asyncio.wait_for(asked, WAIT)
        assert answer["ok"] and answer["restart_needed"] == []
        assert running.ws.config.drain_grace == 3.0 and running.ws.reloads.error == 0


@posix
async def test_a_burst_of_sighups_makes_at_most_two_reloads(tmp_path: Path) -> None:
    async with workstation_with_signals(tmp_path) as running:
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)
        for _ in range(20):
            signal.raise_signal(signal.SIGHUP)
        await wait_until(lambda: running.ws.reloader.waiting)  # the loop has them
        feed(writer, running.text)
        await wait_until(lambda: running.ws.reloads.ok == 1)
        feed(await held_reader_async(running.config), running.text.replace("1s\n", "2s\n"))
        await wait_until(lambda: not running.ws.reloader.running)
        assert running.ws.reloader.prepares == 2 and running.ws.reloads.ok == 2
        assert running.ws.config.drain_grace == 2.0  # the last file


@posix
async def test_a_stop_during_a_held_reload_ends_the_run_and_answers_the_reload(
    tmp_path: Path,
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        make_fifo(running.config)
        asked = asyncio.ensure_future(running.call("reload"))
        writer = await held_reader_async(running.config)
        try:
            running.stop.set()
            answer = await asyncio.wait_for(asked, WAIT)
            assert await asyncio.wait_for(running.task, WAIT) == 0  # the FIFO still empty
        finally:
            os.close(writer)  # the abandoned prepare ends
        assert not answer["ok"] and "stopping" in answer["error"]
        assert (running.ws.reloads.ok, running.ws.reloads.error) == (0, 0)


@posix
async def test_a_renewal_during_a_reload_keeps_its_newer_identity(tmp_path: Path) -> None:
    async with workstation_with_signals(tmp_path) as running:
        ws = running.ws
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)  # began before the renewal
        ws._renewed()  # new files installed: the next dial's contexts, built from them
        renewed = (ws.kept.ctx, ws.session.ctx, ws.revocation_check)
        feed(writer, running.text.replace("1s\n", "2s\n"))
        await wait_until(lambda: ws.reloads.ok == 1)
        assert (ws.kept.ctx, ws.session.ctx, ws.revocation_check) == renewed
        assert ws.config.drain_grace == 2.0  # the rest of the reload applied


class HeldLoad:
    """The workstation's config loader, held in each read until the test lets it go."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.began = threading.Semaphore(0)

    def __call__(self, path: Path) -> WorkstationConfig:
        self.began.release()
        assert self.gate.wait(WAIT), "the test never let the read go"
        return load_workstation_config(path)

    async def reading(self) -> None:
        assert await asyncio.to_thread(self.began.acquire, True, WAIT)


async def test_a_reload_over_the_endpoint_is_held_off_the_loop_on_every_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        held = HeldLoad()
        monkeypatch.setattr(service, "load_workstation_config", held)
        running.config.write_text(running.text.replace("1s\n", "3s\n"))
        asked = asyncio.ensure_future(running.call("reload"))
        await held.reading()
        status = await running.call("status")  # answered meanwhile
        assert status["ok"] and not asked.done()
        held.gate.set()
        answer = await asyncio.wait_for(asked, WAIT)
        assert answer["ok"] and running.ws.config.drain_grace == 3.0


async def test_a_stop_during_a_held_reload_answers_it_on_every_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        held = HeldLoad()
        monkeypatch.setattr(service, "load_workstation_config", held)
        asked = asyncio.ensure_future(running.call("reload"))
        await held.reading()
        try:
            running.stop.set()
            answer = await asyncio.wait_for(asked, WAIT)
            assert await asyncio.wait_for(running.task, WAIT) == 0  # the read still held
        finally:
            held.gate.set()  # the abandoned prepare ends
        assert not answer["ok"] and "stopping" in answer["error"]
        assert (running.ws.reloads.ok, running.ws.reloads.error) == (0, 0)
