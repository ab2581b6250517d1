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
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.net.tls import client_context
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
        await asyncio.gather(*ws._renewed_loads)
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


class HeldBuild:
    """The workstation's TLS context builder (service.client_context), held in each call
    until the test lets it go; the contexts built, in the order of the calls."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.began = threading.Semaphore(0)
        self.built: list[ssl.SSLContext] = []
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> ssl.SSLContext:
        with self._lock:
            slot = len(self.built)
            self.built.append(None)  # type: ignore[arg-type]  # filled below
        self.began.release()
        assert self.gate.wait(WAIT), "the test never let the build go"
        ctx = client_context(*args, **kwargs)
        self.built[slot] = ctx
        return ctx

    async def building(self) -> None:
        assert await asyncio.to_thread(self.began.acquire, True, WAIT)


async def test_a_renewal_builds_its_contexts_off_the_loop_on_every_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewed files are read and their contexts built in a worker thread: the
    control endpoint answers meanwhile, and the contexts are swapped in once built. They
    were built on the loop, which held every link and association for that time."""
    async with workstation_with_signals(tmp_path) as running:
        ws = running.ws
        held = HeldBuild()
        monkeypatch.setattr(service, "client_context", held)
        old = (ws.kept.ctx, ws.session.ctx)
        try:
            ws._renewed()  # the old code built here, on the loop, and met the held build
            await held.building()
            status = await running.call("status")  # answered meanwhile
            assert status["ok"] and (ws.kept.ctx, ws.session.ctx) == old
        finally:
            held.gate.set()
        await asyncio.gather(*ws._renewed_loads)
        assert ws.kept.ctx is ws.ctx is held.built[0] and ws.session.ctx is not old[1]


async def test_a_reload_prepared_before_a_renewal_keeps_the_renewals_identity_whichever_lands_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c90e2af's rule, now that a renewal's contexts are built off the loop too: a reload
    that read the files before the renewal does not replace its contexts, even when the
    reload applies while the renewal's build is still under way."""
    async with workstation_with_signals(tmp_path) as running:
        ws = running.ws
        load, build = HeldLoad(), HeldBuild()
        monkeypatch.setattr(service, "load_workstation_config", load)
        monkeypatch.setattr(service, "client_context", build)
        running.config.write_text(running.text.replace("1s\n", "2s\n"))
        asked = asyncio.ensure_future(running.call("reload"))
        try:
            await load.reading()  # the reload began before the renewal
            ws._renewed()
            await build.building()  # the renewal's build (the first), held
            load.gate.set()
            await build.building()  # the reload's own build, held too
        finally:
            load.gate.set()
            build.gate.set()
        answer = await asyncio.wait_for(asked, WAIT)
        await asyncio.gather(*ws._renewed_loads)
        assert answer["ok"] and ws.config.drain_grace == 2.0  # the rest of the reload applied
        assert ws.kept.ctx is ws.ctx is build.built[0]  # the renewal's, not the reload's


async def test_an_earlier_renewals_late_build_does_not_replace_a_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        ws = running.ws
        first = HeldBuild()
        monkeypatch.setattr(service, "client_context", first)
        try:
            ws._renewed()
            await first.building()  # renewal 1's build, held
            monkeypatch.setattr(service, "client_context", client_context)
            ws._renewed()  # renewal 2, built at once from the newer files
            await wait_until(lambda: len(ws._renewed_loads) == 1)
            latest = ws.kept.ctx
            assert latest is not None and ws.renewals == 2
        finally:
            first.gate.set()
        await asyncio.gather(*ws._renewed_loads)
        assert ws.kept.ctx is latest and first.built[0] is not latest
