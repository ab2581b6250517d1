"""relay.ops.logs: below debug, no data element value reaches a log line (issue 8).

The records come from the real libraries where they can (pydicom's validation warning and
its value-quoting exceptions) and otherwise from pynetdicom's own logger names with the
text pynetdicom writes (its `pretty_dataset` dump of a real dataset).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pydicom.config
import pytest
from aiohttp import web
from pydicom import valuerep
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dsutils import pretty_dataset

from relay.ops import logs
from relay.ops.loglimit import LOG_BURST
from relay.ops.logs import PeerErrorLimit
from relay.ops.reloading import set_log_level


@dataclass
class Captured:
    out: io.StringIO

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def text(self) -> str:
        return self.out.getvalue()

    def clear(self) -> None:
        self.out.seek(0)
        self.out.truncate()


@pytest.fixture
def canary() -> str:
    return f"CANARY{os.urandom(5).hex().upper()}"


Start = Callable[[str], Captured]


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Start]:
    """setup_logging into a buffer; the process's logging as it was afterwards. pydicom
    warns as it does for any library user (the relay's DICOM ends turn its reading checks
    off, relay.dicom.contexts.prepare_pynetdicom, and other tests here start those ends)."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after

    def start(level: str) -> Captured:
        out = io.StringIO()
        logs.setup_logging("agent", level, stream=out)
        return Captured(out)

    yield start
    logging.captureWarnings(False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("pynetdicom").setLevel(saved[2])


def _query(canary: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = f"{canary}^JANE"
    ds.PatientID = f"ID{canary}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1341.42"
    return ds


def _pynetdicom_dump(ds: Dataset, logger: str = "pynetdicom.association") -> None:
    """What pynetdicom does with every request and response identifier."""
    log = logging.getLogger(logger)
    log.info("# Request Identifier")
    for line in pretty_dataset(ds):
        log.info(line)


def test_dataset_dumps_do_not_reach_an_info_log(setup: Start, canary: str) -> None:
    captured = setup("info")
    _pynetdicom_dump(_query(canary))
    _pynetdicom_dump(_query(canary), "pynetdicom.service_class")
    logging.getLogger("relay.dicom.node").info("C-FIND answered", extra={"matches": 1})
    assert canary not in captured.text()
    assert [e["msg"] for e in captured.entries()] == ["C-FIND answered"]


def test_loggers_created_later_are_filtered_too(setup: Start, canary: str) -> None:
    captured = setup("info")
    late = logging.getLogger(f"pynetdicom.later{os.urandom(3).hex()}")
    late.setLevel(logging.DEBUG)  # even a child that lowers its own level
    late.info("(0010,0010) PN [%s]", canary)
    late.debug("(0010,0010) PN [%s]", canary)
    late.error("Failed to decode %s", canary)
    assert canary not in captured.text()
    (entry,) = captured.entries()
    assert entry["level"] == "error" and entry["msg"] == logs.WITHHELD
    assert entry["source"] == "test_logs.py:" + str(entry["source"]).rsplit(":", 1)[1]


def test_library_warnings_and_errors_keep_their_level_not_their_text(
    setup: Start, canary: str
) -> None:
    captured = setup("info")
    ds = Dataset()
    ds.StudyInstanceUID = f"1.2.{canary}"  # pydicom: log record and Python warning, both
    try:
        valuerep.IS(canary)
    except ValueError as exc:
        logging.getLogger("pynetdicom.dimse").error("Received an invalid DIMSE message")
        logging.getLogger("pynetdicom.dimse").exception(exc)
    logging.getLogger("pynetdicom.acse").error("Association Aborted")
    text = captured.text()
    assert canary not in text
    entries = captured.entries()
    by_logger = {(e["logger"], e.get("error")): e for e in entries}
    assert by_logger[("pydicom", None)]["msg"] == logs.WITHHELD
    warned = by_logger[("py.warnings", "UserWarning")]
    assert warned["level"] == "warning" and str(warned["source"]).startswith("valuerep.py:")
    assert by_logger[("pynetdicom.dimse", "ValueError")]["msg"] == logs.WITHHELD
    # pynetdicom's fixed messages say what happened, and pass as they are.
    assert [e["msg"] for e in entries if e["logger"] != "py.warnings"][-3:] == [
        logs.WITHHELD,
        logs.WITHHELD,
        "Association Aborted",
    ]
    # A message not on that short list is withheld even if it looks harmless, and one
    # whose arguments do not format is withheld too (the filter never raises).
    captured.clear()
    logging.getLogger("pynetdicom.acse").error("Association Aborted by %s", canary)
    logging.getLogger("pynetdicom.acse").error("Association %s %s", canary)  # noqa: PLE1206
    assert [e["msg"] for e in captured.entries()] == [logs.WITHHELD, logs.WITHHELD]


def test_our_exceptions_from_pydicom_keep_only_their_type(setup: Start, canary: str) -> None:
    captured = setup("info")
    log = logging.getLogger("relay.dicom.pacs_ops")
    try:
        valuerep.IS(canary)
    except ValueError:
        log.exception("DICOM operation failed")
    try:
        raise OSError(f"connect to pacs.local failed ({canary[:6]})")
    except OSError:
        log.exception("DICOM operation failed")
    try:
        valuerep.IS(canary)
    except ValueError as exc:  # as asyncio reports a task that died of it
        logging.getLogger("asyncio").error("Task exception: %r", exc, exc_info=exc)
    failed, ours = [e for e in captured.entries() if e["logger"] == log.name]
    (task,) = [e for e in captured.entries() if e["logger"] == "asyncio"]
    assert task["msg"] == logs.WITHHELD and task["error"] == "ValueError"
    assert failed["msg"] == "DICOM operation failed"
    assert failed["error"] == "ValueError (text withheld below debug)"
    assert canary not in "".join(
        line for line in captured.text().splitlines() if "OSError" not in line
    )
    # An exception that never went through pydicom or pynetdicom keeps its text.
    assert ours["error"] == f"OSError: connect to pacs.local failed ({canary[:6]})"


def test_at_debug_everything_passes_and_a_reload_switches(setup: Start, canary: str) -> None:
    captured = setup("debug")
    _pynetdicom_dump(_query(canary))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        Dataset().StudyInstanceUID = f"1.2.{canary}"
    assert f"[{canary}^JANE]" in captured.text()
    assert logging.getLogger("pynetdicom").level == logging.INFO  # not its per-PDU noise
    assert sum(canary in str(e["msg"]) for e in captured.entries()) >= 3

    set_log_level("info")  # a SIGHUP that leaves debug
    captured.clear()
    _pynetdicom_dump(_query(canary))
    Dataset().StudyInstanceUID = f"1.3.{canary}"
    assert canary not in captured.text()
    assert logging.getLogger("pynetdicom").level == logging.WARNING

    set_log_level("debug")
    _pynetdicom_dump(_query(canary))
    assert f"[{canary}^JANE]" in captured.text()


def test_warning_level_drops_library_info_and_keeps_the_rest(setup: Start, canary: str) -> None:
    captured = setup("warning")
    _pynetdicom_dump(_query(canary))
    logging.getLogger("pynetdicom.transport").error(
        "TCP Initialisation Error: [Errno 111] Connection refused"
    )
    logging.getLogger("relay.agent.service").warning("gateway link lost", extra={"code": 7})
    assert canary not in captured.text()
    assert [e["msg"] for e in captured.entries()] == [
        "TCP Initialisation Error: [Errno 111] Connection refused",
        "gateway link lost",
    ]


def test_a_thread_that_dies_of_a_value_is_logged_by_type_not_printed(
    setup: Start, canary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python prints a thread's uncaught exception, text and all, to stderr, past every
    filter; pynetdicom and our workers are threads."""
    captured = setup("info")

    def dies() -> None:
        valuerep.IS(canary)  # pydicom's ValueError quotes the value

    worker = threading.Thread(target=dies, name="worker")
    worker.start()
    worker.join()
    (entry,) = [e for e in captured.entries() if e["logger"] == "relay.threads"]
    assert entry["level"] == "error" and entry["thread_name"] == "worker"
    assert entry["error"] == "ValueError (text withheld below debug)"
    assert canary not in captured.text()
    assert canary not in capsys.readouterr().err


def test_a_failed_callback_is_logged_without_its_arguments(setup: Start, canary: str) -> None:
    """asyncio names a failed callback with the reprs of its arguments (a study UID)."""
    captured = setup("info")

    def requeue(study_uid: str) -> None:
        raise RuntimeError("no room")

    async def main() -> None:
        asyncio.get_running_loop().call_soon(requeue, canary)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    (entry,) = [e for e in captured.entries() if e["logger"] == "asyncio"]
    assert entry["msg"] == logs.CALLBACK_FAILED
    assert entry["error"] == "RuntimeError: no room"  # the exception itself is kept
    assert canary not in captured.text()


async def test_a_malformed_request_is_logged_without_its_request_line(
    setup: Start, canary: str
) -> None:
    """aiohttp's server logs a malformed request at error, the bad request line (a QIDO
    query with a patient name, a study UID in the path) in its exception's text."""
    captured = setup("info")
    app = web.Application()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)  # as our servers
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /dicom-web/studies?PatientName={canary} HTTP/9.9\r\n\r\n".encode())
        assert b" 400 Bad Request" in await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    (entry,) = [e for e in captured.entries() if e["logger"] == "aiohttp.server"]
    assert entry["level"] == "error"
    assert entry["error"] == "BadStatusLine (text withheld below debug)"
    assert canary not in captured.text()


async def test_malformed_requests_in_a_flood_are_limited_and_counted(setup: Start) -> None:
    """Whoever reaches a listener (the IT pages from the hospital's network) sends bad
    requests as fast as it connects: aiohttp logs each at error, and the log would be
    filled with them. LOG_BURST lines, then the rest held back and counted on the next."""
    captured = setup("info")
    app = web.Application()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    tries = 3 * LOG_BURST
    try:
        port = runner.addresses[0][1]
        for _ in range(tries):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/9.9\r\n\r\n")
            assert b" 400 Bad Request" in await asyncio.wait_for(reader.read(), 5)
            writer.close()
    finally:
        await runner.cleanup()
    lines = [e for e in captured.entries() if e["logger"] == "aiohttp.server"]
    assert len(lines) == LOG_BURST  # the rest within the same 10 s: held back


def test_the_line_after_a_held_back_flood_says_how_many() -> None:
    now = [0.0]
    limit = PeerErrorLimit(clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise ValueError("bad request line")
        except ValueError:
            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                     "Error handling request", (), sys.exc_info())  # fmt: skip

    let = [limit.filter(record()) for _ in range(LOG_BURST + 5)]
    assert let.count(True) == LOG_BURST
    now[0] += 10.0
    after = record()
    assert limit.filter(after) and after.__dict__["suppressed"] == 5
    other = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "ours", (), None)
    assert all(limit.filter(other) for _ in range(3 * LOG_BURST))  # only aiohttp's limited


def test_pynetdicom_formats_its_standard_lines_only_where_they_are_shown(
    setup: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below debug its standard handlers built every PDU's and DIMSE message's lines for
    nothing (6 ms of accepting getscu's request); they follow the level, reloads too."""
    from pynetdicom import AE, _config
    from pynetdicom._handlers import standard_pdu_recv_handler
    from pynetdicom.association import Association

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")

    def bound() -> bool:
        assoc = Association(AE(), "requestor")
        handlers = assoc.get_handlers(evt.EVT_PDU_RECV)
        assert isinstance(handlers, list)  # a notification event's
        return any(h == standard_pdu_recv_handler for h, _ in handlers)

    setup("info")
    assert _config.LOG_HANDLER_LEVEL == "none" and not bound()
    logs.set_level("debug")
    assert _config.LOG_HANDLER_LEVEL == "standard" and bound()
    logs.set_level("warning")
    assert not bound()
