"""A pynetdicom 'viewer' for the node tests: blocking calls, run them with asyncio.to_thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import rawds
from relay.dicom.contexts import MODELS

from .helpers import EXPLICIT, scu


@dataclass
class GetResult:
    received: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # uid -> (ts, data)
    statuses: list[Dataset] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def final(self) -> Dataset:
        return self.statuses[-1]

    @property
    def pending(self) -> list[Dataset]:
        return [s for s in self.statuses if s.Status == 0xFF00]


def associates(port: int) -> bool:
    """Whether the node accepts an association now (released at once)."""
    assoc = scu("VIEWER", timeout=5).associate(
        "127.0.0.1", port, contexts=[build_context(Verification)], ae_title="RELAY"
    )
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def echo(port: int) -> Dataset:
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=[build_context(Verification)], ae_title="RELAY"
    )
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    return status


def find(port: int, ident: Dataset, root: str = "study") -> tuple[list[Dataset], Dataset]:
    model = MODELS[(root, "find")]
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=[build_context(model)], ae_title="RELAY"
    )
    assert assoc.is_established
    matches: list[Dataset] = []
    final = Dataset()
    for status, match in assoc.send_c_find(ident, model):
        if status and status.Status in (0xFF00, 0xFF01):
            assert match is not None
            matches.append(match)
        else:
            final = status
    assoc.release()
    return matches, final


def get(
    port: int,
    ident: Dataset,
    *,
    classes: Sequence[str],
    syntaxes: Sequence[str] = (EXPLICIT,),
    root: str = "study",
    on_pending: Callable[[Any, int, Dataset], None] | None = None,
    store_status: int = 0,
    msg_id: int = 1,
    before_store: Callable[[], None] | None = None,
) -> GetResult:
    """C-GET; `on_pending(assoc, n, status)` is called for each response (to cancel, say),
    `before_store()` at the start of each C-STORE sub-operation (to play a slow viewer)."""
    model = MODELS[(root, "get")]
    result = GetResult()
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        if before_store is not None:
            before_store()
        req = event.request
        with lock:
            uid = str(req.AffectedSOPInstanceUID)
            result.received[uid] = (str(event.context.transfer_syntax), req.DataSet.getvalue())
            result.order.append(uid)
        return store_status

    cxs = [build_context(model)] + [build_context(c, list(syntaxes)) for c in classes]
    assoc = scu("VIEWER").associate(
        "127.0.0.1",
        port,
        contexts=cxs,
        ae_title="RELAY",
        ext_neg=[build_role(c, scp_role=True) for c in classes],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    for n, (status, _ident) in enumerate(assoc.send_c_get(ident, model, msg_id=msg_id)):
        result.statuses.append(status)
        if on_pending is not None:
            on_pending(assoc, n, status)
    if assoc.is_established:
        assoc.release()
    return result


def move(
    port: int,
    ident: Dataset,
    destination: str,
    root: str = "study",
    *,
    msg_id: int = 1,
    on_pending: Callable[[Any, int, Dataset], None] | None = None,
    identifiers: list[Dataset | None] | None = None,
) -> list[Dataset]:
    """C-MOVE; each response's identifier (the Failed SOP Instance UID List) goes to
    `identifiers` if given."""
    model = MODELS[(root, "move")]
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=[build_context(model)], ae_title="RELAY"
    )
    assert assoc.is_established
    statuses = []
    for n, (status, answer) in enumerate(
        assoc.send_c_move(ident, destination, model, msg_id=msg_id)
    ):
        statuses.append(status)
        if identifiers is not None:
            identifiers.append(answer)
        if on_pending is not None:
            on_pending(assoc, n, status)
    assoc.release()
    return statuses


def store(port: int, sop_class: str, sop_instance: str, data: bytes, ts: str = EXPLICIT) -> Dataset:
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=[build_context(sop_class, [ts])], ae_title="RELAY"
    )
    assert assoc.is_established
    status = assoc.send_c_store(rawds.EncodedDataset(sop_class, sop_instance, ts, data))
    assoc.release()
    return status
