"""The whole DICOM path driven by real DCMTK tools, all in this process but the tools.

DCMTK (echoscu, findscu, getscu, movescu, storescu) talks to the workstation's DicomNode on
127.0.0.1; the node relays over in-memory streams to serve_dicom_stream, which talks to the
embedded PACS. storescp, which binds every address, runs in a network namespace of its own
and is reached through a small forwarder. Every tool runs with TCP_NODELAY=1 and a timeout.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from relay.dicom import rawds
from relay.dicom.pacs_target import PacsTarget
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.interop.harness import dcmtk
from tests.interop.harness.netns import NetNS
from tests.interop.harness.tools import require_root
from tests.ports import dead_port

from .chain import Chain
from .helpers import EXPLICIT, capturing_scp, quirky_instance

pytestmark = pytest.mark.interop

CT = samples.make_study(8, rows=128, cols=128, seed=41)
MR = samples.make_study(4, modality="MR", seed=42)
QUIRKY = quirky_instance()
ALL = [*CT, *MR, QUIRKY]
BY_UID = {i.sop_instance: i for i in ALL}


def _attr(inst: samples.EncodedInstance, keyword: str) -> str:
    return str(rawds.decode_dataset(inst.data, EXPLICIT).get(keyword, ""))


CT_STUDY = _attr(CT[0], "StudyInstanceUID")
MR_STUDY = _attr(MR[0], "StudyInstanceUID")
QUIRKY_STUDY = _attr(QUIRKY, "StudyInstanceUID")
CT_SERIES = _attr(CT[0], "SeriesInstanceUID")
TOOL_TIMEOUT = 60.0


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's dataset, after its file meta: what the PACS's bytes must equal."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _elements(ds: object) -> list[tuple[int, str]]:
    """A C-FIND match as comparable data (the file meta findscu adds differs per file)."""
    return [(int(e.tag), str(e.value)) for e in ds]  # type: ignore[attr-defined]


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(ALL)) as p:
        yield p


def target(p: EmbeddedPacs, timeout: float = 10) -> PacsTarget:
    return PacsTarget(ae_title=p.ae_title, host="127.0.0.1", port=p.port, timeout=timeout)


@pytest.fixture
async def chain(pacs: EmbeddedPacs) -> AsyncIterator[Chain]:
    c = Chain(target(pacs))
    await c.start()
    yield c
    await c.stop()


def node_of(c: Chain) -> dcmtk.DicomNode:
    return dcmtk.DicomNode("127.0.0.1", c.port, "RELAY")


def direct(p: EmbeddedPacs) -> dcmtk.DicomNode:
    return dcmtk.DicomNode("127.0.0.1", p.port, p.ae_title)


async def test_echoscu(chain: Chain, pacs: EmbeddedPacs) -> None:
    result = await asyncio.to_thread(dcmtk.echoscu, node_of(chain), timeout=TOOL_TIMEOUT)
    assert result.ok and result.status == "Success"
    assert pacs.events.echoes == 1


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        (
            "study",
            "STUDY",
            {
                "PatientName": "",
                "StudyDate": "",
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedInstances": "",
            },
        ),
        ("patient", "PATIENT", {"PatientName": "", "PatientBirthDate": ""}),
        ("study", "SERIES", {"StudyInstanceUID": CT_STUDY, "Modality": "", "SeriesNumber": ""}),
        (
            "study",
            "IMAGE",
            {"StudyInstanceUID": CT_STUDY, "SeriesInstanceUID": CT_SERIES, "InstanceNumber": ""},
        ),
        ("patient", "STUDY", {"PatientID": "RELAY0002", "StudyDescription": ""}),
        ("study", "STUDY", {"PatientName": "DOE*", "AccessionNumber": ""}),
    ],
)
async def test_findscu_matches_a_direct_query(
    chain: Chain, pacs: EmbeddedPacs, model: dcmtk.Model, level: dcmtk.Level, keys: dict[str, str]
) -> None:
    relayed = await asyncio.to_thread(
        dcmtk.findscu,
        node_of(chain),
        level,
        keys,
        model=model,
        timeout=TOOL_TIMEOUT,
    )
    straight = await asyncio.to_thread(
        dcmtk.findscu,
        direct(pacs),
        level,
        keys,
        model=model,
        timeout=TOOL_TIMEOUT,
    )
    assert relayed.status == straight.status == "Success"
    assert len(relayed.matches) == len(straight.matches) > 0
    assert sorted(map(_elements, relayed.matches)) == sorted(map(_elements, straight.matches))


@pytest.mark.parametrize(
    ("level", "keys", "expected"),
    [
        ("STUDY", {"StudyInstanceUID": CT_STUDY}, CT),
        ("STUDY", {"StudyInstanceUID": QUIRKY_STUDY}, [QUIRKY]),
        ("SERIES", {"StudyInstanceUID": CT_STUDY, "SeriesInstanceUID": CT_SERIES}, CT),
        (
            "IMAGE",
            {
                "StudyInstanceUID": CT_STUDY,
                "SeriesInstanceUID": CT_SERIES,
                "SOPInstanceUID": CT[3].sop_instance,
            },
            [CT[3]],
        ),
    ],
)
async def test_getscu_receives_the_pacs_bytes(
    chain: Chain,
    tmp_path: Path,
    level: dcmtk.Level,
    keys: dict[str, str],
    expected: list[samples.EncodedInstance],
) -> None:
    result = await asyncio.to_thread(
        dcmtk.getscu,
        node_of(chain),
        tmp_path / "get",
        level,
        keys,
        extra_args=["+B"],
        timeout=TOOL_TIMEOUT,
    )
    assert result.ok and result.status == "Success"
    assert result.suboperations.get("Completed") == len(expected)
    assert result.suboperations.get("Failed") == 0
    got = {}
    for path in result.files:
        data = dataset_bytes(path)
        uid = rawds.check_dataset(data, EXPLICIT)["sop_instance"]
        got[uid] = data
    assert got == {i.sop_instance: i.data for i in expected}


async def test_getscu_patient_root(chain: Chain, tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        dcmtk.getscu,
        node_of(chain),
        tmp_path / "get",
        "PATIENT",
        {"PatientID": "RELAY0002"},
        model="patient",
        extra_args=["+B"],
        timeout=TOOL_TIMEOUT,
    )
    assert result.ok and result.suboperations.get("Completed") == len(MR)
    assert sorted(dataset_bytes(p) for p in result.files) == sorted(i.data for i in MR)


class Forwarder:
    """127.0.0.1:port here -> 127.0.0.1:target inside a namespace (for storescp)."""

    def __init__(self, ns: NetNS, target_port: int) -> None:
        self.ns = ns
        self.target_port = target_port
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = await asyncio.to_thread(
            self.ns.create_connection, "127.0.0.1", self.target_port, timeout=5
        )
        sock.setblocking(False)
        r2, w2 = await asyncio.open_connection(sock=sock)

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, OSError):
                w.close()

        await asyncio.gather(copy(reader, w2), copy(r2, writer))
        for w in (writer, w2):
            w.close()


async def test_movescu_to_storescp(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    require_root()
    with NetNS() as ns:
        scp_port = 11113
        with dcmtk.storescp(
            tmp_path / "dest", ns=ns, port=scp_port, ae_title="STORESCP", extra_args=["+B"]
        ) as scp:
            async with Forwarder(ns, scp_port) as fwd_port:
                c = Chain(target(pacs), destinations={"STORESCP": ("127.0.0.1", fwd_port)})
                await c.start()
                try:
                    result = await asyncio.to_thread(
                        dcmtk.movescu,
                        node_of(c),
                        "STORESCP",
                        "STUDY",
                        {"StudyInstanceUID": MR_STUDY},
                        timeout=TOOL_TIMEOUT,
                    )
                    files = await asyncio.to_thread(scp.wait_for_files, len(MR), timeout=30)
                finally:
                    await c.stop()
    assert result.ok and result.status == "Success"
    assert sorted(dataset_bytes(p) for p in files) == sorted(i.data for i in MR)


def _as_class(inst: samples.EncodedInstance, sop_class: str, n: int) -> samples.EncodedInstance:
    """`inst` as another SOP class, in a series of its own (a screen capture, a GSPS)."""
    ds = rawds.decode_dataset(inst.data, EXPLICIT)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"2.25.{4400 + n}"
    ds.SeriesInstanceUID = f"2.25.{4500 + n}"
    return samples.EncodedInstance(
        sop_class, str(ds.SOPInstanceUID), EXPLICIT, rawds.encode_dataset(ds, EXPLICIT)
    )


async def test_movescu_of_a_study_with_several_sop_classes(tmp_path: Path) -> None:
    """The PACS gives counts, so the agent surveys nothing: the classes after the first
    instance's must still have contexts at the destination (C-GET had them already)."""
    require_root()
    ct = samples.make_study(3, rows=16, cols=16, seed=44)
    study = [
        *ct,
        _as_class(ct[0], "1.2.840.10008.5.1.4.1.1.7", 1),  # Secondary Capture
        _as_class(ct[0], "1.2.840.10008.5.1.4.1.1.11.1", 2),  # Grayscale Softcopy PS
    ]
    uid = _attr(ct[0], "StudyInstanceUID")
    with (
        EmbeddedPacs(MemoryStore(study)) as p,
        NetNS() as ns,
        dcmtk.storescp(
            tmp_path / "dest", ns=ns, port=11113, ae_title="STORESCP", extra_args=["+B"]
        ) as scp,
    ):
        async with Forwarder(ns, 11113) as fwd_port:
            c = Chain(target(p), destinations={"STORESCP": ("127.0.0.1", fwd_port)})
            await c.start()
            try:
                result = await asyncio.to_thread(
                    dcmtk.movescu, node_of(c), "STORESCP", "STUDY",
                    {"StudyInstanceUID": uid}, timeout=TOOL_TIMEOUT, check=False,
                )  # fmt: skip
                assert result.status == "Success", result.output
                files = await asyncio.to_thread(scp.wait_for_files, len(study), timeout=30)
            finally:
                await c.stop()
    assert sorted(dataset_bytes(f) for f in files) == sorted(i.data for i in study)


async def test_movescu_unknown_destination_is_a801(chain: Chain) -> None:
    result = await asyncio.to_thread(
        dcmtk.movescu,
        node_of(chain),
        "NOSUCHAE",
        "STUDY",
        {"StudyInstanceUID": MR_STUDY},
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    assert "MoveDestinationUnknown" in (result.status or "") or "a801" in result.output.lower()
    assert chain.headers == []


async def test_movescu_to_a_configured_destination_that_is_down(pacs: EmbeddedPacs) -> None:
    """The destination is in the node's config but nothing listens there: movescu gets a
    failure that says so (0xC008, naming it), not 0xA801, and nothing is retrieved."""
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = int(down.getsockname()[1])
        c = Chain(target(pacs), destinations={"DOWNSCP": ("127.0.0.1", port)})
        await c.start()
        try:
            result = await asyncio.to_thread(
                dcmtk.movescu,
                node_of(c),
                "DOWNSCP",
                "STUDY",
                {"StudyInstanceUID": MR_STUDY},
                extra_args=["-d"],  # debug: the response's status code and error comment
                timeout=TOOL_TIMEOUT,
                check=False,
            )
        finally:
            await c.stop()
    out = result.output
    assert "Move response with error status (Failed: UnableToProcess)" in out, out
    assert re.search(r"DIMSE Status\s*: 0xc008: Failed: Unable to process", out), out
    assert re.search(
        rf"\(0000,0902\) LO \[move destination DOWNSCP at 127.0.0.1:{port} not reachable\]", out
    ), out
    assert "MoveDestinationUnknown" not in result.output
    assert c.headers == [] and pacs.events.gets == 0 and pacs.events.finds == 0
    assert c.node_stats.operations == {("move", "failure"): 1}


async def test_movescu_cancel_cancels_at_the_pacs(tmp_path: Path) -> None:
    study = samples.make_study(40, rows=32, cols=32, seed=43)
    uid = _attr(study[0], "StudyInstanceUID")
    with (
        EmbeddedPacs(MemoryStore(study), send_delay=0.05) as slow,
        capturing_scp("DEST") as (captured, port),
    ):
        c = Chain(target(slow), destinations={"DEST": ("127.0.0.1", port)})
        await c.start()
        try:
            result = await asyncio.to_thread(
                dcmtk.movescu,
                node_of(c),
                "DEST",
                "STUDY",
                {"StudyInstanceUID": uid},
                extra_args=["--cancel", "3"],
                timeout=TOOL_TIMEOUT,
                check=False,
            )
            await c.settle()
        finally:
            await c.stop()
        assert slow.events.cancels == 1
        assert slow.events.instances_sent < 40
    assert result.status is not None and "Cancel" in result.status
    assert len(captured.items) < 40


async def test_storescu_upload_lands_in_the_pacs(
    chain: Chain, pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    new = samples.make_study(2, rows=64, cols=64, seed=44)
    paths = []
    for i, inst in enumerate(new):
        path = tmp_path / f"up{i}.dcm"
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    result = await asyncio.to_thread(dcmtk.storescu, node_of(chain), paths, timeout=TOOL_TIMEOUT)
    assert result.ok
    for inst in new:
        assert pacs.instance_bytes(inst.sop_instance) == inst.data


async def test_pacs_down_fails_within_a_bounded_time(tmp_path: Path) -> None:
    with dead_port() as port:  # held: nothing can listen there during the test
        await _pacs_down_fails_within_a_bounded_time(port, tmp_path)


async def _pacs_down_fails_within_a_bounded_time(port: int, tmp_path: Path) -> None:
    c = Chain(PacsTarget(ae_title="GONE", host="127.0.0.1", port=port, timeout=3))
    await c.start()
    try:
        echo = await asyncio.to_thread(dcmtk.echoscu, node_of(c), timeout=30, check=False)
        find = await asyncio.to_thread(
            dcmtk.findscu, node_of(c), "STUDY", {}, timeout=30, check=False
        )
        get = await asyncio.to_thread(
            dcmtk.getscu,
            node_of(c),
            tmp_path / "g",
            "STUDY",
            {"StudyInstanceUID": CT_STUDY},
            timeout=30,
            check=False,
        )
    finally:
        await c.stop()
    for result in (echo, find, get):
        assert not result.ok, result.output
        assert result.status is not None and not result.status.startswith("Success")
    assert get.files == ()


async def test_unknown_study(chain: Chain, tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        dcmtk.getscu,
        node_of(chain),
        tmp_path / "g",
        "STUDY",
        {"StudyInstanceUID": "1.2.3.4.5.6.7.8"},
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    assert result.files == ()
    assert result.suboperations.get("Completed", 0) == 0
    assert result.status in ("Success", None) or "Fail" in result.status


async def test_tunnel_drop_without_resume_ends_in_failure(tmp_path: Path) -> None:
    study = samples.make_study(30, rows=256, cols=256, seed=45)
    uid = _attr(study[0], "StudyInstanceUID")
    with EmbeddedPacs(MemoryStore(study)) as p:
        c = Chain(target(p), drop_after=len(study[0].data) * 5, resume_window=0)
        await c.start()
        try:
            result = await asyncio.to_thread(
                dcmtk.getscu,
                node_of(c),
                tmp_path / "g",
                "STUDY",
                {"StudyInstanceUID": uid},
                extra_args=["+B"],
                timeout=TOOL_TIMEOUT,
                check=False,
            )
        finally:
            await c.stop()
    assert not result.ok
    assert result.status is not None and not result.status.startswith(("Success", "Warning"))
    subops = result.suboperations
    assert subops.get("Failed", 0) > 0
    assert subops.get("Completed", 0) == len(result.files) < 30
    by_uid = {i.sop_instance: i.data for i in study}
    for path in result.files:  # what was received is complete and intact
        data = dataset_bytes(path)
        assert data == by_uid[rawds.check_dataset(data, EXPLICIT)["sop_instance"]]


async def test_findscu_cancel(pacs: EmbeddedPacs) -> None:
    c = Chain(target(pacs))
    await c.start()
    try:
        result = await asyncio.to_thread(
            dcmtk.findscu,
            node_of(c),
            "IMAGE",
            {"StudyInstanceUID": CT_STUDY, "SeriesInstanceUID": CT_SERIES},
            extra_args=["--cancel", "1"],
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    finally:
        await c.stop()
    assert result.status is not None and result.status.startswith(("Cancel", "Success"))
