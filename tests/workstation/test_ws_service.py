"""The workstation as a process, and the DICOM wiring of both ends through the gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relay.agent.service import run_agent
from relay.dicom import rawds
from relay.dicom.pacs_target import PacsTarget
from relay.ops.config import Address
from relay.workstation.config import DicomNodeConfig
from relay.workstation.service import run_workstation
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.dicom import viewer
from tests.dicom.helpers import EXPLICIT, query
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_exchange,
    tcp_service,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import HOST, make_pki
from tests.ports import announced, await_listening
from tests.workstation.test_ws_forward import workstation_up

ROOT = Path(__file__).resolve().parents[2]


async def test_relay_workstation_process_forwards_and_exits_0_on_a_stop_signal(
    tmp_path: Path,
) -> None:
    """SIGTERM where it is a signal; on Windows it is TerminateProcess (exit status 1, no
    drain): there Ctrl-Break, to the process's own console group."""
    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        stop = asyncio.Event()
        a_config = agent_config(pki, tmp_path, [gw.port], {"echo": (echo.port, True)})
        agent = asyncio.create_task(
            run_agent(a_config, stop=stop, handlers={}, handle_signals=False)
        )
        config = tmp_path / "workstation.yaml"
        config.write_text(
            f"gateway: {HOST}:{gw.port}\n"
            f"identity_dir: {identity}\n"
            f'forward: {{"{HOST}:0": echo}}\n'
            "reconnect: {initial: 0.05s, max: 0.5s}\n"
            "drain_grace: 1s\n"
        )
        log = tmp_path / "ws.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.cli", "workstation", "--config", str(config),
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
            )  # fmt: skip
        try:
            alive = lambda: proc.returncode is None  # noqa: E731
            fwd = (await await_listening(log, "forward", service="echo", alive=alive)).port
            await wait_until(lambda: gw.server.router.sites() == ["main"], within=30)
            await wait_until(lambda: len(gw.server.links.devices) == 1, within=30)
            payload = b"through a real workstation process " * 1000
            assert await asyncio.wait_for(tcp_exchange(fwd, payload), WAIT) == payload
            proc.send_signal(getattr(signal, "CTRL_BREAK_EVENT", signal.SIGTERM))
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stop.set()
            await asyncio.wait_for(agent, WAIT)
        assert code == 0, log.read_text()
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        messages = [e["msg"] for e in entries]
        assert "link up" in messages and "workstation stopped" in messages
        assert all(payload[:20].decode() not in line for line in log.read_text().splitlines())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_c_echo_from_a_viewer_reaches_the_pacs(tmp_path: Path) -> None:
    """Both ends' DICOM wiring: the node uses Tunnel.open_stream, the agent the dicom handler."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from relay_dev.pacs import EmbeddedPacs

    pki = make_pki(tmp_path / "pki")
    pacs = EmbeddedPacs(ae_title="RELAYPACS")
    pacs.start()
    try:
        async with running_gateway(pki, tmp_path) as gw:
            a_config = dataclasses.replace(
                agent_config(pki, tmp_path, [gw.port], {}),
                pacs=PacsTarget("RELAYPACS", HOST, pacs.port, move_listen=None, timeout=10.0),
            )
            stop = asyncio.Event()
            agent = asyncio.create_task(run_agent(a_config, stop=stop, handle_signals=False))
            w_config = dataclasses.replace(
                workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port),
                dicom=DicomNodeConfig(Address(HOST, 0), "RELAY"),
            )
            try:
                with announced() as seen:
                    async with workstation_up(w_config) as (ws, _, _):
                        node_port = seen.bound("dicom", ae_title="RELAY").port
                        await wait_until(lambda: gw.server.router.sites() == ["main"])
                        await asyncio.wait_for(ws.kept.up.wait(), WAIT)

                        def echo() -> int:
                            viewer = AE(ae_title="VIEWER")
                            viewer.add_requested_context(Verification)
                            assoc = viewer.associate(HOST, node_port, ae_title="RELAY")
                            assert assoc.is_established
                            try:
                                status = assoc.send_c_echo()
                                return int(status.Status)
                            finally:
                                assoc.release()

                        assert await asyncio.wait_for(asyncio.to_thread(echo), 30) == 0x0000
                        assert ws.tunnel.stats.opened >= 1
            finally:
                stop.set()
                await asyncio.wait_for(agent, WAIT)
    finally:
        pacs.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_stop_lets_a_dicom_retrieval_finish_within_the_drain_grace(
    tmp_path: Path,
) -> None:
    """Stopping the workstation mid C-GET: new associations are refused at once, the
    retrieval runs to its end over the sealed session (the README's "open streams finish
    within drain_grace"), and only then does the workstation exit 0."""
    study = samples.make_study(12, rows=16, cols=16, seed=91)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    pki = make_pki(tmp_path / "pki")
    with EmbeddedPacs(MemoryStore(study), send_delay=0.1) as pacs:
        async with running_gateway(pki, tmp_path) as gw:
            a_config = dataclasses.replace(
                agent_config(pki, tmp_path, [gw.port], {}),
                pacs=PacsTarget("RELAYPACS", HOST, pacs.port, move_listen=None, timeout=10.0),
            )
            stop_agent = asyncio.Event()
            agent = asyncio.create_task(run_agent(a_config, stop=stop_agent, handle_signals=False))
            w_config = dataclasses.replace(
                workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port,
                                   drain_grace=20.0),
                dicom=DicomNodeConfig(Address(HOST, 0), "RELAY"),
            )  # fmt: skip
            stop = asyncio.Event()
            started: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            try:
                with announced() as seen:
                    ws = asyncio.create_task(
                        run_workstation(
                            w_config, stop=stop, started=started.set_result, handle_signals=False
                        )
                    )
                    await asyncio.wait_for(started, WAIT)
                    port = seen.bound("dicom", ae_title="RELAY").port
                await wait_until(lambda: gw.server.router.sites() == ["main"])
                get = asyncio.create_task(
                    asyncio.to_thread(
                        viewer.get,
                        port,
                        query("STUDY", StudyInstanceUID=uid),
                        classes=[samples.CT_IMAGE_STORAGE],
                    )
                )
                await wait_until(lambda: pacs.events.instances_sent >= 2)
                stop.set()
                await wait_until(lambda: not viewer.associates(port))
                assert not ws.done()
                result = await asyncio.wait_for(get, WAIT)
                assert await asyncio.wait_for(ws, WAIT) == 0
            finally:
                stop.set()
                stop_agent.set()
                await asyncio.wait_for(agent, WAIT)
    assert result.final.Status == 0 and len(result.received) == len(study)


async def test_a_certificate_that_expired_while_running_is_said_once_and_in_readiness(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway refuses an expired device certificate with a TLS alert after the
    handshake, which asyncio does not hand to the protocol: only the gateway's log said
    `reason: expired`, the workstation "refused us" at every retry. Now one error says to
    enroll again, and readiness (what `relay workstation status` shows) says it too."""
    from datetime import UTC, datetime, timedelta

    from relay.workstation.service import Workstation
    from tests.ends_helpers import device_identity_dir, running_gateway, wait_until

    pki = make_pki(tmp_path / "pki")
    identity = device_identity_dir(pki, tmp_path)
    now = datetime.now(UTC)
    short = pki.device("short", lifetime=timedelta(seconds=2), not_before=now)
    (identity / "device.crt").write_bytes(short.cert.read_bytes())
    (identity / "device.key").write_bytes(short.key.read_bytes())
    async with running_gateway(pki, tmp_path) as gw:
        ws = Workstation(workstation_config(identity, tmp_path, gw.port))  # valid: it starts
        await asyncio.sleep(
            max(0.0, (now + timedelta(seconds=2.2) - datetime.now(UTC)).total_seconds())
        )
        with caplog.at_level("ERROR", logger="relay.workstation.service"):
            await ws.start()
            try:
                await wait_until(lambda: ws.kept.stats.failures >= 3)
            finally:
                await ws.shutdown(0.1)
        assert ws.kept.stats.last_error == "refused"
        assert ws.not_after is not None
        said = [r.getMessage() for r in caplog.records if "expired at" in r.getMessage()]
        assert said == [f"device certificate expired at {ws.not_after.isoformat()}; enroll "
                        f"again: relay enroll CODE --dir {identity}"]  # fmt: skip
        ready, why = ws.readiness()
        assert not ready and why == said[0]
