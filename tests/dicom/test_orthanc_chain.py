"""The agent side against a real PACS (Orthanc), with DCMTK as the viewer.

Orthanc runs in a network namespace (it binds every address); the agent reaches it through
a forwarder, and with `retrieve: move` Orthanc reaches the agent's storage SCP through
another. What the viewer gets through the relay must equal what it gets from Orthanc
directly: the same matches, the same dataset bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from relay.dicom import rawds
from relay.dicom.agent import DicomAgent
from relay.dicom.pacs_target import PacsTarget
from relay.ops.config import Address
from relay_dev import samples
from tests.interop.harness import Orthanc, dcmtk

from .chain import Chain
from .forward import IntoNamespace, OutOfNamespace
from .helpers import EXPLICIT, quirky_instance

pytestmark = pytest.mark.interop

CT = samples.make_study(6, rows=128, cols=128, seed=51)
MR = samples.make_study(3, modality="MR", seed=52)
QUIRKY = quirky_instance()
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
MR_STUDY = str(rawds.decode_dataset(MR[0].data, EXPLICIT).StudyInstanceUID)
TIMEOUT = 60.0


def dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def load(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = []
    for i, inst in enumerate([*CT, *MR, QUIRKY]):
        path = tmp_path / "upload" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    orthanc.upload(paths)


def node_of(c: Chain) -> dcmtk.DicomNode:
    return dcmtk.DicomNode("127.0.0.1", c.port, "RELAY")


async def test_find_and_get_through_the_relay_equal_orthanc_direct(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    await asyncio.to_thread(load, orthanc, tmp_path)
    async with IntoNamespace(orthanc.ns, orthanc.dicom_port) as port:
        c = Chain(PacsTarget(ae_title=orthanc.ae_title, host="127.0.0.1", port=port, timeout=20))
        await c.start()
        try:
            keys = {
                "PatientName": "",
                "StudyDate": "",
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedInstances": "",
            }
            relayed = await asyncio.to_thread(
                dcmtk.findscu, node_of(c), "STUDY", keys, timeout=TIMEOUT
            )
            direct = await asyncio.to_thread(
                dcmtk.findscu, orthanc.node, "STUDY", keys, timeout=TIMEOUT
            )
            got = await asyncio.to_thread(
                dcmtk.getscu,
                node_of(c),
                tmp_path / "relay",
                "STUDY",
                {"StudyInstanceUID": CT_STUDY},
                extra_args=["+B"],
                timeout=TIMEOUT,
            )
            want = await asyncio.to_thread(
                dcmtk.getscu,
                orthanc.node,
                tmp_path / "direct",
                "STUDY",
                {"StudyInstanceUID": CT_STUDY},
                extra_args=["+B"],
                timeout=TIMEOUT,
            )
        finally:
            await c.stop()
    norm = lambda ds: sorted((int(e.tag), str(e.value)) for e in ds)  # noqa: E731
    assert sorted(map(norm, relayed.matches)) == sorted(map(norm, direct.matches))
    assert len(relayed.matches) == 3
    assert got.suboperations.get("Completed") == want.suboperations.get("Completed") == len(CT)
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))


async def test_retrieve_by_move_from_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    await asyncio.to_thread(load, orthanc, tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(IntoNamespace(orthanc.ns, orthanc.dicom_port))
        target = PacsTarget(
            ae_title=orthanc.ae_title,
            host="127.0.0.1",
            port=port,
            timeout=20,
            retrieve="move",
            move_ae_title="RELAYMOVE",
            move_listen=Address("127.0.0.1", 0),
        )
        agent = DicomAgent(target)
        await agent.start()
        stack.push_async_callback(agent.stop)
        assert agent.move_receiver is not None  # listening on the port it got
        # 11150: fixed, in Orthanc's own namespace, below the ephemeral range
        ns_port = await stack.enter_async_context(
            OutOfNamespace(orthanc.ns, 11150, agent.move_receiver.port)
        )
        await asyncio.to_thread(orthanc.add_modality, "RELAYMOVE", "127.0.0.1", ns_port)
        c = Chain(target, move_receiver=agent.move_receiver)
        await c.start()
        stack.push_async_callback(c.stop)
        got = await asyncio.to_thread(
            dcmtk.getscu,
            node_of(c),
            tmp_path / "relay",
            "STUDY",
            {"StudyInstanceUID": MR_STUDY},
            extra_args=["+B"],
            timeout=TIMEOUT,
        )
        want = await asyncio.to_thread(
            dcmtk.getscu,
            orthanc.node,
            tmp_path / "direct",
            "STUDY",
            {"StudyInstanceUID": MR_STUDY},
            extra_args=["+B"],
            timeout=TIMEOUT,
        )
    assert got.status == "Success" and got.suboperations.get("Completed") == len(MR)
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))
    assert c.summaries and c.summaries[0].op == "move"


async def test_upload_through_the_relay_lands_in_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc (and storescu) may rewrite what they store; the relay must add nothing to that:
    the instance read back equals the one read back after a direct upload."""
    path = tmp_path / "up.dcm"
    path.write_bytes(QUIRKY.file_bytes())
    study = {"StudyInstanceUID": str(rawds.decode_dataset(QUIRKY.data, EXPLICIT).StudyInstanceUID)}

    def read_back(where: str) -> list[bytes]:
        back = dcmtk.getscu(
            orthanc.node, tmp_path / where, "STUDY", study, extra_args=["+B"], timeout=TIMEOUT
        )
        return [dataset_bytes(p) for p in back.files]

    await asyncio.to_thread(dcmtk.storescu, orthanc.node, [path], timeout=TIMEOUT)
    direct = await asyncio.to_thread(read_back, "direct")
    await asyncio.to_thread(orthanc.clear)
    assert await asyncio.to_thread(orthanc.instances) == []
    async with IntoNamespace(orthanc.ns, orthanc.dicom_port) as port:
        c = Chain(PacsTarget(ae_title=orthanc.ae_title, host="127.0.0.1", port=port, timeout=20))
        await c.start()
        try:
            result = await asyncio.to_thread(dcmtk.storescu, node_of(c), [path], timeout=TIMEOUT)
        finally:
            await c.stop()
    assert result.ok
    relayed = await asyncio.to_thread(read_back, "relayed")
    assert len(relayed) == 1 and relayed == direct
