"""Structured JSON logs on stdout, one object per line, with no patient data below debug.

Callers pass identifiers through `extra=` (device, site, stream, peer, reason...). Nothing
here ever formats payload: our log calls carry identities, counts and codes only.

pynetdicom and pydicom print data element values: pynetdicom dumps request and response
identifiers at info and quotes decode errors at error, pydicom warns with the offending
value (as a log record and as a Python warning). Unless the role runs at debug,
`PatientDataFilter`, on the one handler every logger reaches (so also loggers created
later), drops their records below warning and withholds the text of the others (a few
fixed messages pass). Any record's exception that went through their code keeps only its
type, and another library's message about such an exception (asyncio's) is withheld.
aiohttp's exceptions keep only their type too: a malformed request's holds its request
line (a study UID or a patient name in the path or query).
Python warnings and exceptions that end a thread are routed into logging so that the
filter sees them too.
At debug everything passes: debug logs may contain patient data (README says so).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from relay.ops.loglimit import LogLimiter

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

#: Loggers whose records may quote data element values ("py.warnings": captured warnings).
VALUE_LOGGERS: Final = ("pynetdicom", "pydicom", "py.warnings")
#: Our own loggers: their messages never hold a value (only an exception's text may).
OUR_LOGGERS: Final = ("relay", "gateway", "relay_dev")
#: Packages whose exceptions' text may quote data element values.
VALUE_PACKAGES: Final = ("pynetdicom", "pydicom")
#: Loggers whose records' exception text may quote a request: aiohttp's server logs a
#: malformed request at error with the bad line in the exception (a path or query with a
#: study UID or a patient name), and an unhandled handler exception with its text.
REQUEST_LOGGERS: Final = ("aiohttp",)
WITHHELD: Final = "message withheld: it may quote patient data (log_level debug shows it)"

# pynetdicom's fixed operational messages, worth keeping at info: no value can be in them.
_SAFE_MESSAGES: Final = re.compile(
    r"Association (?:Aborted|Rejected|request failed: unable to connect to remote)"
    r"|TCP Initialisation Error: \[Errno -?\d{1,5}\] [A-Za-z ]{1,60}"
    r"|Connection closed (?:before the entire PDU was received|while waiting for DIMSE message)"
    r"|(?:ACSE|DIMSE|Network) timeout reached[a-z ]{0,80}"
    r"|No accepted presentation contexts"
    r"|Move SCP: Unable to associate with destination AE"
)
# asyncio's report of a failed call_soon/call_later callback: "Exception in callback
# f(arg, ...)" quotes the arguments (a study UID, say); the traceback that follows does not.
_CALLBACK_HEAD: Final = "Exception in callback "
CALLBACK_FAILED: Final = "Exception in a callback (its arguments withheld below debug)"
# What logging.captureWarnings logs: "path:lineno: Category: text...".
_WARNING_HEAD: Final = re.compile(r"(?:.*/)?([^/:]+):(\d+): (\w+):")


def _is_value_logger(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in VALUE_LOGGERS)


def _message(record: logging.LogRecord) -> str:
    """The record's text; "" if its arguments do not format (a filter must not raise)."""
    try:
        return record.getMessage()
    except Exception:
        return ""


def _from_value_package(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, passed through pydicom/pynetdicom."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            module = str(tb.tb_frame.f_globals.get("__name__", ""))
            if module.split(".", 1)[0] in VALUE_PACKAGES:
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


class PatientDataFilter(logging.Filter):
    """Below debug: no data element value passes, whichever logger a record comes from.

    Reads the root logger's level at each record, so a reload to or from debug applies at
    once. Mutates what it keeps (it sits on the only handler).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
            return True
        if record.name == "asyncio" and _message(record).startswith(_CALLBACK_HEAD):
            record.msg, record.args = CALLBACK_FAILED, ()  # its arguments' reprs
        if _is_value_logger(record.name):
            if record.levelno < logging.WARNING:
                return False
            if record.exc_info is None and _SAFE_MESSAGES.fullmatch(_message(record)):
                return True
            self._withhold(record)
        elif record.exc_info is not None and record.name.split(".", 1)[0] in REQUEST_LOGGERS:
            self._strip_exception(record)
        elif record.exc_info is not None and _from_value_package(record.exc_info[1]):
            if record.name.split(".", 1)[0] in OUR_LOGGERS:
                self._strip_exception(record)
            else:  # asyncio's "Task exception was never retrieved" quotes the exception
                self._withhold(record)
        return True

    @staticmethod
    def _withhold(record: logging.LogRecord) -> None:
        source = f"{record.module}.py:{record.lineno}"
        kind = ""
        if record.name == "py.warnings":
            head = _WARNING_HEAD.match(_message(record))
            source, kind = (f"{head[1]}:{head[2]}", head[3]) if head else ("", "Warning")
        elif record.exc_info is not None and record.exc_info[0] is not None:
            kind = record.exc_info[0].__name__
        record.msg, record.args = WITHHELD, ()
        record.exc_info = record.exc_text = record.stack_info = None
        record.__dict__["source"] = source
        if kind:
            record.__dict__["error"] = kind

    @staticmethod
    def _strip_exception(record: logging.LogRecord) -> None:
        assert record.exc_info is not None
        kind = record.exc_info[0].__name__ if record.exc_info[0] is not None else "Exception"
        record.exc_info = record.exc_text = record.stack_info = None
        record.__dict__.setdefault("error", f"{kind} (text withheld below debug)")


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(entry, separators=(",", ":"))


def set_level(level: str) -> None:
    """The role's level (at start-up and on reload) and the value loggers' levels with it.

    Below debug, pynetdicom builds no info record at all (the filter would drop it);
    at debug it logs at info (its identifier dumps), not its per-PDU debug noise.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    debug = root.level <= logging.DEBUG
    logging.getLogger("pynetdicom").setLevel(logging.INFO if debug else logging.WARNING)
    pynetdicom_handlers_follow_level()


def pynetdicom_handlers_follow_level() -> None:
    """pynetdicom's "standard" event handlers, bound to each association it creates,
    format every PDU and DIMSE message they see (for getscu's A-ASSOCIATE-RQ, 120
    contexts, about 6 ms of the 15 our node took to accept it) into lines that only its
    info and debug show: bound only where the pynetdicom logger shows info. Whichever of
    set_level and the DICOM ends' start (relay.dicom.contexts.prepare_pynetdicom) comes
    last sets it; without pynetdicom imported (the gateway never does) there is nothing
    to set."""
    config = sys.modules.get("pynetdicom._config")
    if config is not None:
        shown = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        config.LOG_HANDLER_LEVEL = "standard" if shown else "none"  # type: ignore[attr-defined]


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (pynetdicom's, our workers'): through the filtered
    handler, not printed whole to stderr, where its text could quote a value."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("relay.threads").error(
        "a thread ended with an exception",
        exc_info=args.exc_value,
        extra={"thread_name": name[:64]},
    )


class PeerErrorLimit(logging.Filter):
    """aiohttp's server errors, limited: it logs each malformed request at error level,
    and whoever reaches a listener (the IT pages from the hospital's network, the
    DICOMweb server from the PC) could send them as fast as it can connect, filling the
    log and rotating everything else out of it. Per kind of error: `LOG_BURST` lines,
    then one per 10 s, the next line saying how many were held back (`suppressed`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._limit = LogLimiter()
        self._lock = threading.Lock()
        self._clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "aiohttp.server" or record.name.startswith("aiohttp.server.")):
            return True
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        with self._lock:
            held = self._limit.allow(kind, self._clock())
        if held is None:
            return False
        if held:
            record.__dict__["suppressed"] = held
        return True


def setup_logging(role: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Replace root handlers with one filtered JSON handler on stdout (or `stream`)."""
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter(role))
    handler.addFilter(PeerErrorLimit())
    handler.addFilter(PatientDataFilter())
    logging.getLogger().handlers[:] = [handler]
    logging.captureWarnings(True)  # pydicom warns with values: through the filter, not stderr
    threading.excepthook = _log_thread_exception  # and threads' deaths too
    set_level(level)
