"""A small in-process PACS (pynetdicom) for `relay demo` and the fast tests.

It answers C-ECHO, C-FIND (Patient Root and Study Root, all four levels), C-GET, C-MOVE (to
the AEs it is told about) and C-STORE, and sends each stored instance's own bytes (through
`rawds.EncodedDataset`) so tests can demand byte-identical retrievals. The store is
pluggable: in memory, a directory (nothing kept in memory but headers), or a synthetic study
generated on demand. Knobs for tests: a delay per sent instance, and counters of what
happened (cancels seen, associations, stores).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pynetdicom import AE, build_context, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import contexts, rawds
from relay_dev import matching
from relay_dev.matching import Record
from relay_dev.samples import EncodedInstance, SyntheticStudy, part10

log = logging.getLogger(__name__)
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


def header_of(data: bytes, transfer_syntax: str) -> Dataset:
    """The dataset without pixel data, for indexing (PS3.5 encoding from the syntax)."""
    implicit, little, deflated = rawds.ts_encoding(transfer_syntax)
    if deflated:
        data = rawds.inflate(data, 1 << 30)
    return read_dataset(
        BytesIO(data), implicit, little, stop_when=lambda tag, vr, length: tag == _PIXEL_DATA
    )


class InstanceStore(Protocol):
    """Where the embedded PACS keeps instances."""

    def records(self) -> Sequence[Record]: ...

    def read(self, record: Record) -> bytes: ...

    def add(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes
    ) -> Record: ...


class MemoryStore:
    """Everything in memory: for small studies."""

    def __init__(self, instances: Iterable[EncodedInstance] = ()) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        self._data: dict[str, bytes] = {}
        for inst in instances:
            self.add(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)

    def records(self) -> Sequence[Record]:
        with self._lock:
            return list(self._records.values())

    def read(self, record: Record) -> bytes:
        with self._lock:
            return self._data[record.sop_instance]

    def add(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> Record:
        record = Record(sop_class, sop_instance, transfer_syntax, header_of(data, transfer_syntax),
                        len(data))  # fmt: skip
        with self._lock:
            self._records[sop_instance] = record
            self._data[sop_instance] = data
        return record

    def raw(self, sop_instance: str) -> bytes:
        with self._lock:
            return self._data[sop_instance]


class DirectoryStore:
    """Part 10 files in a directory; only headers stay in memory."""

    def __init__(self, path: str | os.PathLike[str], instances: Iterable[EncodedInstance] = ()):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[str, tuple[Record, Path, int]] = {}
        for file in sorted(self.path.glob("*.dcm")):
            meta, offset = split_dataset(file)
            ts = str(meta.TransferSyntaxUID)
            with file.open("rb") as f:
                f.seek(offset)
                data = f.read()
            record = Record(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                            ts, header_of(data, ts), len(data))  # fmt: skip
            self._records[record.sop_instance] = (record, file, offset)
        for inst in instances:
            self.add(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)

    def records(self) -> Sequence[Record]:
        with self._lock:
            return [r for r, _, _ in self._records.values()]

    def read(self, record: Record) -> bytes:
        with self._lock:
            _, file, offset = self._records[record.sop_instance]
        with file.open("rb") as f:
            f.seek(offset)
            return f.read()

    def add(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> Record:
        record = Record(sop_class, sop_instance, transfer_syntax,
                        header_of(data, transfer_syntax), len(data))  # fmt: skip
        blob = part10(sop_class, sop_instance, transfer_syntax, data)
        file = self.path / f"{sop_instance}.dcm"
        tmp = file.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(file)
        with self._lock:
            self._records[sop_instance] = (record, file, len(blob) - len(data))
        return record


class SyntheticStore:
    """A generated study that is never held: each read encodes the instance afresh."""

    def __init__(self, study: SyntheticStudy) -> None:
        self.study = study
        self._index: dict[str, int] = {}
        self._records: list[Record] = []
        for i in range(study.count):
            header = study.header(i)
            uid = str(header.SOPInstanceUID)
            self._index[uid] = i
            self._records.append(
                Record(str(header.SOPClassUID), uid, "1.2.840.10008.1.2.1", header)
            )
        self._extra = MemoryStore()

    def records(self) -> Sequence[Record]:
        return [*self._records, *self._extra.records()]

    def read(self, record: Record) -> bytes:
        i = self._index.get(record.sop_instance)
        if i is None:
            return self._extra.read(record)
        return self.study.instance(i).data

    def add(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> Record:
        return self._extra.add(sop_class, sop_instance, transfer_syntax, data)


@dataclass
class PacsEvents:
    """What the PACS saw, for tests (thread-safe enough for counters read after the fact)."""

    associations: int = 0
    echoes: int = 0
    finds: int = 0
    gets: int = 0
    moves: int = 0
    stores: int = 0
    cancels: int = 0
    instances_sent: int = 0
    store_failures: int = 0
    most_proposed: int = 0  # the most presentation contexts one association proposed
    cancelled: threading.Event = field(default_factory=threading.Event)
    sending: threading.Event = field(default_factory=threading.Event)


class EmbeddedPacs:
    """A pynetdicom SCP on loopback; `start()` returns once it listens."""

    def __init__(
        self,
        store: InstanceStore | None = None,
        *,
        ae_title: str = "RELAYPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        destinations: dict[str, tuple[str, int]] | None = None,
        send_delay: float = 0.0,
        find_delay: float = 0.0,
        timeout: float = 30.0,
        max_associations: int = 16,
        require_called_aet: bool = False,
    ) -> None:
        """`require_called_aet` makes it reject associations addressed to another AE title
        (as strict PACS do); `send_delay` slows every sent instance, `find_delay` every
        C-FIND match (for cancel tests)."""
        rawds.install()
        self.store: InstanceStore = store if store is not None else MemoryStore()
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.destinations = dict(destinations or {})
        self.send_delay = send_delay
        self.find_delay = find_delay
        self.timeout = timeout
        self.max_associations = max_associations
        self.require_called_aet = require_called_aet
        self.events = PacsEvents()
        self._server: Any = None

    # -- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = 0
        ae.require_called_aet = self.require_called_aet
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, name, self.timeout)
        ae.connection_timeout = self.timeout
        handlers: list[Any] = [
            contexts.NODELAY,
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server(
            (self.host, self._port),
            block=False,
            evt_handlers=handlers,
            contexts=contexts.scp_contexts(
                storage_role_selection=True, extra=list(contexts.MODELS.values())
            ),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def held(self) -> int:
        """Associations open now (the tests of the agent's spare association)."""
        return len(self._server.active_associations) if self._server is not None else 0

    def abort_all(self, *, wait: bool = True) -> None:
        """Abort every open association, as a PACS does on an idle timeout or a restart;
        `wait=False` sends the A-ABORTs from threads of their own and returns at once."""
        for assoc in self._server.active_associations if self._server is not None else []:
            if wait:
                assoc.abort()
            else:
                threading.Thread(target=assoc.abort, name="pacs-abort", daemon=True).start()

    def __enter__(self) -> EmbeddedPacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content --------------------------------------------------------------------

    def add(self, instances: Iterable[EncodedInstance]) -> None:
        for inst in instances:
            self.store.add(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)

    def instance_bytes(self, sop_instance: str) -> bytes:
        for r in self.store.records():
            if r.sop_instance == sop_instance:
                return self.store.read(r)
        raise KeyError(sop_instance)

    def has(self, sop_instance: str) -> bool:
        return any(r.sop_instance == sop_instance for r in self.store.records())

    # -- handlers (pynetdicom threads) ----------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        self.events.associations += 1
        proposed = len(event.assoc.requestor.requested_contexts)
        self.events.most_proposed = max(self.events.most_proposed, proposed)

    def _on_echo(self, event: Any) -> int:
        self.events.echoes += 1
        return 0x0000

    def _identifier(self, event: Any) -> Dataset | None:
        try:
            return event.identifier  # type: ignore[no-any-return]
        except Exception:
            return None

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        self.events.finds += 1
        identifier = self._identifier(event)
        if identifier is None:
            yield 0xC310, None  # unable to decode
            return
        try:
            responses = matching.find(self.store.records(), identifier)
        except matching.QueryError as exc:
            status = Dataset()
            status.Status = 0xC320
            status.ErrorComment = str(exc)[:64]
            yield status, None
            return
        for rsp in responses:
            if self.find_delay:
                time.sleep(self.find_delay)
            if event.is_cancelled:
                self._cancelled()
                yield 0xFE00, None
                return
            yield 0xFF00, rsp

    def _select(self, event: Any) -> list[Record] | Dataset:
        identifier = self._identifier(event)
        if identifier is None:
            status = Dataset()
            status.Status = 0xC510
            status.ErrorComment = "unable to decode identifier"
            return status
        try:
            return matching.select(self.store.records(), identifier)
        except matching.QueryError as exc:
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = str(exc)[:64]
            return status

    def _send(self, event: Any, records: list[Record]) -> Iterator[tuple[int, Dataset | None]]:
        """Each record's own bytes, as C-STORE sub-operations; stops on C-CANCEL."""
        for record in records:
            if event.is_cancelled:
                self._cancelled()
                yield 0xFE00, None
                return
            if self.send_delay:
                time.sleep(self.send_delay)
            self.events.sending.set()
            data = self.store.read(record)
            self.events.instances_sent += 1
            yield (
                0xFF00,
                rawds.EncodedDataset(
                    record.sop_class, record.sop_instance, record.transfer_syntax, data
                ),
            )

    def _on_get(self, event: Any) -> Iterator[Any]:
        self.events.gets += 1
        selected = self._select(event)
        if isinstance(selected, Dataset):
            yield 1
            yield selected, None
            return
        yield len(selected)
        yield from self._send(event, selected)

    def _on_move(self, event: Any) -> Iterator[Any]:
        self.events.moves += 1
        destination = self.destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None
            return
        selected = self._select(event)
        if isinstance(selected, Dataset):
            cx = [build_context(Verification)]
            kw = {"contexts": cx, "evt_handlers": [contexts.NODELAY]}
            yield destination[0], destination[1], kw
            yield 1
            yield selected, None
            return
        pairs = sorted({(r.sop_class, r.transfer_syntax) for r in selected})
        cxs = [build_context(sop, [ts]) for sop, ts in pairs][: contexts.MAX_CONTEXTS]
        kwargs = {"contexts": cxs or [build_context(Verification)],
                  "evt_handlers": [contexts.NODELAY]}  # fmt: skip
        yield destination[0], destination[1], kwargs
        yield len(selected)
        yield from self._send(event, selected)

    def _on_store(self, event: Any) -> int | Dataset:
        self.events.stores += 1
        req = event.request
        ts = str(event.context.transfer_syntax)
        data = req.DataSet.getvalue()
        try:
            rawds.check_instance(
                data, ts, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
            )
            self.store.add(str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID), ts,
                           data)  # fmt: skip
        except Exception as exc:
            self.events.store_failures += 1
            status = Dataset()
            status.Status = 0xC000
            status.ErrorComment = f"cannot understand: {exc}"[:64]
            return status
        return 0x0000

    def _cancelled(self) -> None:
        self.events.cancels += 1
        self.events.cancelled.set()
