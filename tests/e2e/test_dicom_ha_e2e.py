"""Issue 5, HA: two gateways behind a real HAProxy; kill the workstation's during a retrieve.

The chain of test_dicom_e2e (real `relay` processes, the embedded PACS in its own
process, slowed so that a retrieve is in flight) with a second `relay gateway`, the agent
linked to both, and the workstation's `gateway:` pointing at HAProxy (TCP mode, TLS
passed through, health from each gateway's /readyz, as deploy/haproxy/haproxy.cfg). The
gateway that carries the workstation's link (its relay_links{role="device"} metric) is
SIGKILLed mid-retrieval: the workstation reconnects through HAProxy to the other gateway
and resumes, and the viewer gets every instance of the study exactly once.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.dicom import rawds
from relay_dev import samples
from tests.e2e.dicom_chain import (
    HOST,
    PACS_AE,
    DicomChain,
    NsForwarder,
    PacsProcess,
    dataset_bytes,
)
from tests.interop.harness import DicomNode, NetNS, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 120.0  # one DCMTK run, the resume window included
WAIT = 45.0
CT_PATIENT = samples.CT_STUDY.patient_id
HAPROXY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def haproxy_config(tmp: Path, front: int, gateways: list[tuple[int, int]]) -> Path:
    """The deploy example on our ports, without chroot, user switch or syslog."""
    text = HAPROXY_CFG.read_text()
    mapping = {
        "bind 127.0.0.1:8443": f"bind {HOST}:{front}",
        "127.0.0.1:18443 check port 19101": f"{HOST}:{gateways[0][0]} check port {gateways[0][1]}",
        "127.0.0.1:28443 check port 29101": f"{HOST}:{gateways[1][0]} check port {gateways[1][1]}",
        "inter 2s fall 2 rise 2": "inter 500ms fall 2 rise 2",
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
    path = tmp / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


class HaChain(DicomChain):
    """DicomChain with a second gateway, the agent on both, the workstation via HAProxy."""

    haproxy: subprocess.Popen[bytes] | None = None

    def setup(self) -> HaChain:
        super().setup()
        self.reporters["gateway2_metrics"] = ("gateway2", "metrics")
        for name in ("gateway2", "haproxy"):
            self.reserve(name)
        text = (self.tmp / "gateway.yaml").read_text()
        (self.tmp / "gateway2.yaml").write_text(
            text.replace(f":{self.ports['gateway']}\n", f":{self.ports['gateway2']}\n")
        )
        agent = (self.tmp / "agent.yaml").read_text()
        one = f"gateways: ['{HOST}:{self.ports['gateway']}']"
        assert one in agent
        (self.tmp / "agent.yaml").write_text(
            agent.replace(
                one,
                f"gateways: ['{HOST}:{self.ports['gateway']}', '{HOST}:{self.ports['gateway2']}']",
            )
        )
        ws = (self.tmp / "ws1.yaml").read_text()
        first = f"gateway: {HOST}:{self.ports['gateway']}\n"
        assert ws.startswith(first)
        (self.tmp / "ws1.yaml").write_text(
            ws.replace(first, f"gateway: {HOST}:{self.ports['haproxy']}\n", 1)
        )
        from tests.e2e.chain import RELAY, Proc

        self.procs["gateway2"] = Proc(
            "gateway2",
            [*RELAY, "gateway", "--config", str(self.tmp / "gateway2.yaml")],
            self.tmp / "gateway2.log",
        )
        return self

    def start_all(self) -> None:
        self.start("gateway", "gateway2", "agent")
        haproxy_config(  # the gateways' metrics ports: the ones they reported
            self.tmp,
            self.ports["haproxy"],
            [
                (self.ports["gateway"], self.ports["gateway_metrics"]),
                (self.ports["gateway2"], self.ports["gateway2_metrics"]),
            ],
        )
        with (self.tmp / "haproxy.log").open("ab") as log:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.tmp / "haproxy.cfg")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.start("ws1")

    def stop_all(self) -> None:
        if "gateway2" in self.procs:
            self.procs["gateway2"].stop()
        super().stop_all()
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)

    def device_links(self, gateway: str) -> float:
        """relay_links{role="device"} of one gateway ("gateway" or "gateway2"), 0 if down."""
        try:
            _, body = self.http_get(self.ports[f"{gateway}_metrics"], "/metrics")
        except OSError:
            return 0.0
        total = 0.0
        for line in body.splitlines():
            if line.startswith("relay_links{") and 'role="device"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def agent_links(self) -> float:
        _, body = self.http_get(self.ports["agent_metrics"], "/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith("relay_links{") and 'role="gateway"' in line
        )


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("findscu", "getscu", "movescu", "storescp", "haproxy")
    # A synthetic CT study of 150 instances (512 x 512), sent slowly.
    server = PacsProcess(
        tmp_path_factory.mktemp("ha-pacs"),
        data="none",
        synthetic_bytes=150 * (512 * 512 * 2 + 2048),
        send_delay=0.04,
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def viewer() -> Iterator[NsForwarder]:
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


@pytest.fixture
def chain(pacs: PacsProcess, viewer: NsForwarder, tmp_path: Path) -> Iterator[HaChain]:
    c = HaChain(tmp_path / "chain", pacs.port, destinations={"STORESCP": viewer.port})
    (tmp_path / "chain").mkdir()
    c.setup()
    try:
        c.start_all()
        c.wait_ready(WAIT)
        assert wait_for(lambda: c.agent_links() >= 2, WAIT), c.logs()
        yield c
    finally:
        c.stop_all()


def direct(pacs: PacsProcess) -> DicomNode:
    return DicomNode(HOST, pacs.port, PACS_AE)


def biggest_study(pacs: PacsProcess) -> tuple[str, set[str]]:
    """The study with most instances, and its SOP Instance UIDs, as the PACS reports them."""
    studies = dcmtk.findscu(direct(pacs), "STUDY", {"PatientID": ""}, timeout=60).values(
        "StudyInstanceUID"
    )
    best: tuple[str, set[str]] = ("", set())
    for study in studies:
        series = dcmtk.findscu(
            direct(pacs), "SERIES", {"StudyInstanceUID": study}, timeout=60
        ).values("SeriesInstanceUID")
        uids: set[str] = set()
        for s in series:
            uids |= set(
                dcmtk.findscu(
                    direct(pacs),
                    "IMAGE",
                    {"StudyInstanceUID": study, "SeriesInstanceUID": s},
                    timeout=60,
                ).values("SOPInstanceUID")
            )
        if len(uids) > len(best[1]):
            best = (study, uids)
    return best


def kill_the_device_gateway(chain: HaChain) -> str:
    """SIGKILL the gateway that carries the workstation's link; its name."""
    links = {g: chain.device_links(g) for g in ("gateway", "gateway2")}
    busy = [g for g, n in links.items() if n >= 1]
    assert len(busy) == 1, f"device links per gateway: {links}"
    os.kill(chain.pid(busy[0]), signal.SIGKILL)
    return busy[0]


def uid_of(path: Path) -> str:
    data = dataset_bytes(path)
    return str(rawds.decode_dataset(data, "1.2.840.10008.1.2.1").SOPInstanceUID)


def test_move_survives_the_death_of_the_workstations_gateway(
    chain: HaChain, pacs: PacsProcess, viewer: NsForwarder, tmp_path: Path
) -> None:
    study, want = biggest_study(pacs)
    assert len(want) >= 100
    # -uf: a new file for every instance received, so one sent twice would show.
    with (
        NetNS() as ns,
        dcmtk.storescp(tmp_path / "dest", ns=ns, ae_title="STORESCP",
                       extra_args=["+B", "-uf"]) as scp,
    ):  # fmt: skip
        viewer.target(ns, scp.port)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                future = pool.submit(
                    dcmtk.movescu, chain.node, "STORESCP", "STUDY",
                    {"StudyInstanceUID": study}, timeout=TIMEOUT, check=False,
                )  # fmt: skip
                assert wait_for(lambda: len(scp.files()) >= 10, 60), chain.logs()
                killed = kill_the_device_gateway(chain)
                at_kill = len(scp.files())
                result = future.result(timeout=TIMEOUT + 10)
            # storescp answered every C-STORE; wait until it has written them all
            assert wait_for(lambda: len(scp.files()) >= len(want), 30), chain.logs()
            files = list(scp.files())
        finally:
            viewer.target(None, None)
    uids = [uid_of(f) for f in files]
    print(f"\nkilled {killed} with {at_kill} of {len(want)} instances stored; movescu: "
          f"{result.status} {result.suboperations}")  # fmt: skip
    assert at_kill < len(want), "the retrieve was over before the kill"
    assert result.ok and result.status is not None and result.status.startswith("Success"), (
        result.output[-3000:] + chain.logs()
    )
    assert result.suboperations.get("Failed", 0) == 0  # (counts only shown with -d)
    assert len(uids) == len(set(uids)) == len(files)  # none twice
    assert set(uids) == want  # none missing


def test_get_survives_the_death_of_the_workstations_gateway(
    chain: HaChain, pacs: PacsProcess, tmp_path: Path
) -> None:
    study, want = biggest_study(pacs)
    out = tmp_path / "getscu"
    out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            dcmtk.getscu, chain.node, out, "STUDY", {"StudyInstanceUID": study},
            extra_args=["+B"], timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert wait_for(lambda: len(list(out.iterdir())) >= 10, 60), chain.logs()
        kill_the_device_gateway(chain)
        result = future.result(timeout=TIMEOUT + 10)
    uids = [uid_of(f) for f in result.files]
    assert result.ok and result.status is not None and result.status.startswith("Success"), (
        result.output[-3000:] + chain.logs()
    )
    assert result.suboperations.get("Completed") == len(want)
    assert len(uids) == len(set(uids)) and set(uids) == want
