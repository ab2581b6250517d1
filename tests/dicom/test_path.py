"""The DICOM path calls downwards only: no module of relay/dicom calls back into a module
that called it, on any thread, for a C-GET through the node with the agent retrieving by
C-GET or by C-MOVE (docs/internals/dicom.md has the measurement and the layers)."""

from __future__ import annotations

import pytest

from .path_trace import measure_get

# Which relay.dicom modules may call which (a layer calls only layers below it).
LAYERS = {
    "relay.dicom.node": 0,  # workstation end, pynetdicom SCP
    "relay.dicom.agent": 0,  # agent end, loop side
    "relay.dicom.session": 1,  # workstation stream, loop side
    "relay.dicom.pacs_ops": 1,  # agent end, pynetdicom SCU thread
    "relay.dicom.encoder": 1,  # agent end, encodes the stream's messages (pool threads)
    "relay.dicom.move_check": 1,
    "relay.dicom.pacs_echo": 1,  # the agent's readiness check (not on this path)
    "relay.dicom.intake": 2,  # instances from the PACS (C-GET handler, C-MOVE SCP)
    "relay.dicom.survey": 2,  # the study's C-FIND beside a retrieve
    "relay.dicom.spare": 2,  # the association left for the next request
    "relay.dicom.pacs_assoc": 3,  # requests an association with the PACS
    "relay.dicom.ending": 4,  # ends associations whatever the peer does (both ends)
    "relay.dicom.counts": 5,  # the PACS's sub-operation counts, checked (pynetdicom calls it)
    "relay.dicom.bridge": 5,
    "relay.dicom.codec": 5,
    "relay.dicom.offer": 5,  # the pixel codecs the workstation announces
    "relay.dicom.contexts": 5,
    "relay.dicom.rawds": 5,
    "relay.dicom.stats": 6,
    "relay.dicom.status": 6,
    "relay.dicom.pacs_target": 6,  # the `pacs:` settings, a value
    "relay.dicom.exclusive": 6,  # how the node and the C-MOVE SCP bind their port
    "relay.dicom.uids": 6,  # what counts as a UID
    "relay.dicom.uidset": 6,  # a retrieve's UIDs as keyed digests (skip list, delivered)
    "relay.dicom.checkpoint": 6,  # pynetdicom's reactor pause, without its race
    "relay.dicom.pace": 6,  # the pace a device's request is read at (the codec reads it)
    "relay.dicom.uploads": 7,  # the bytes of devices' requests held (pace charges it)
}


@pytest.mark.parametrize("agent_retrieve", ["get", "move"])
async def test_a_c_get_crosses_the_dicom_modules_downwards_only(agent_retrieve: str) -> None:
    trace = await measure_get(4, agent_retrieve=agent_retrieve)
    assert trace.cycles("relay.dicom") == []
    dicom = trace.modules("relay.dicom")
    assert dicom <= set(LAYERS), dicom - set(LAYERS)
    upwards = [(a, b) for a, b in trace.within("relay.dicom") if LAYERS[a] >= LAYERS[b]]
    assert upwards == []
    # Outside relay/dicom the DICOM layer touches the stream it is given and, when it
    # starts, what announces its listening ports and the settings' address type, and what
    # limits the C-MOVE receiver's warnings about other hosts (relay.ops.loglimit), and
    # where pynetdicom's standard log handlers follow the log level (relay.ops.logs); and
    # the pixel codecs (relay/codecs: which codec, and the codecs themselves).
    assert trace.modules() - dicom <= {
        "relay.codecs.choice",
        "relay.codecs.pixels",
        "relay.net.bytestream",
        "relay.ops.listening",
        "relay.ops.config",
        "relay.ops.loglimit",
        "relay.ops.logs",
        "relay.ops.ratelimit",
    }
