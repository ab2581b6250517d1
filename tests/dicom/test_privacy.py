"""Our own DICOM errors and log lines name what went wrong, never a value (issue 8).

Their texts reach logs at warning and info (a PACS that sends a malformed instance, a
survey that fails), and UIDs identify a patient's study and images.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest

from relay.dicom import rawds, survey
from relay.dicom.agent import serve_dicom_stream
from relay.dicom.codec import (
    DicomProtocolError,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Request,
    read_message,
    write_message,
)
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.rawds import encode_dataset
from relay.net.bytestream import pipe
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT, query

STUDY = samples.make_study(2, rows=16, cols=16, seed=8)


def _uid() -> str:
    return f"1.2.826.0.1.3680043.10.1341.{int.from_bytes(os.urandom(8), 'big')}"


def test_a_malformed_uid_is_refused_without_quoting_it() -> None:
    bad = _uid() + ".X"
    with pytest.raises((DicomProtocolError, ValueError), match="sop_instance") as caught:
        MessageCodec().encode(Instance(STUDY[0].sop_class, bad, EXPLICIT, STUDY[0].data))
    assert bad[:-2] not in str(caught.value)


def test_a_sop_uid_mismatch_names_neither_uid() -> None:
    inst, other = STUDY[0], _uid()
    with pytest.raises(rawds.MalformedDataset, match="sop_instance") as caught:
        rawds.check_instance(inst.data, EXPLICIT, inst.sop_class, other)
    assert inst.sop_instance not in str(caught.value)
    assert other not in str(caught.value)


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(STUDY)) as p:
        yield p


async def test_a_failed_survey_is_logged_by_type_only(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom's and pynetdicom's exception texts quote values: the survey's line keeps
    only the type, and the retrieve goes on without the survey."""
    study_uid = str(rawds.decode_dataset(STUDY[0].data, EXPLICIT).StudyInstanceUID)

    def failing_survey(*_: object, **__: object) -> None:
        raise ValueError(f"Invalid value for VR UI: '{study_uid}'")  # as pydicom words it

    monkeypatch.setattr(survey, "walk", failing_survey)
    pacs.send_delay = 0.3  # the survey runs beside the retrieve: let it get there first
    target = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
    ident = encode_dataset(query("STUDY", StudyInstanceUID=study_uid), EXPLICIT)
    request = Request(op="retrieve", root="study", transfer_syntax=EXPLICIT, dataset=ident)
    a, b = pipe()
    codec = MessageCodec()
    caplog.set_level(logging.INFO, logger="relay.dicom.pacs_ops")
    server = asyncio.create_task(serve_dicom_stream(b, target))
    await write_message(a, codec, request)
    msgs: list[Message] = []
    while (msg := await asyncio.wait_for(read_message(a, codec), 20)) is not None:
        msgs.append(msg)
    await asyncio.wait_for(server, 20)
    assert sum(isinstance(m, Instance) for m in msgs) == 2
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
    (line,) = [r.getMessage() for r in caplog.records if "survey failed" in r.getMessage()]
    assert line == "survey failed, retrieving without it: ValueError"
