"""`relay workstation --log-file`: the log file of a workstation without a console, kept
to a bounded size by the process itself.

On Windows (the scheduled task that runs `pythonw`/`relayw.exe`) a file that a process
holds open cannot be renamed or truncated by another, so no external tool (logrotate,
newsyslog) can rotate it: left alone it grows for as long as the PC stays logged in. So
the process rotates it: when the file reaches MAX_BYTES, at the end of a line, it becomes
FILE.1 (FILE.1 becomes FILE.2 ..., FILE.BACKUPS is dropped). 10 MiB is weeks of a
workstation's JSON lines at info (it logs per study and per link, not per instance) and
small enough to attach to a ticket; five of them keep the history of a few months within
60 MiB of the user's disk.

Everything written to stdout and stderr goes through it (log records, a traceback, a
line printed before logging was set up), so the file holds it all, in order.
"""

from __future__ import annotations

import io
import logging.handlers
import os
import threading
from pathlib import Path

__all__ = ["BACKUPS", "MAX_BYTES", "RotatingLogFile"]

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
# A rotation refused (Windows: another program has FILE or FILE.1 open without sharing
# delete) is tried again after this many more bytes, not at every line.
_RETRY_AFTER = 1024 * 1024


class RotatingLogFile(io.TextIOBase):
    """A text stream that appends to `path` in UTF-8 and rotates it at `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        # the standard library's renaming scheme (FILE.1 ... FILE.n); only its rollover
        # is used, never its records
        self._files = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._lock = threading.Lock()
        self._line_start = True
        self._rotate_at = max_bytes

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only in io.TextIOBase
        """What a writer may write: any text."""
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self._line_start and self._stream().tell() >= self._rotate_at:
                self._rotate()
            stream = self._stream()
            stream.write(text)
            stream.flush()
            if text:
                self._line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._files.stream is not None:
                self._files.stream.flush()

    def fileno(self) -> int:
        return self._stream().fileno()

    def close(self) -> None:
        with self._lock:
            self._files.close()
        super().close()

    def _stream(self) -> io.TextIOWrapper:
        if self._files.stream is None:  # a failed rollover leaves it closed
            self._files.stream = self._files._open()
        stream: io.TextIOWrapper = self._files.stream
        return stream

    def _rotate(self) -> None:
        try:
            self._files.doRollover()
        except OSError:  # keep appending to FILE; try again a little later
            self._rotate_at = self._stream().tell() + _RETRY_AFTER
        else:
            self._rotate_at = self.max_bytes


def open_log_file(path: str | os.PathLike[str]) -> RotatingLogFile:
    """The stream for `--log-file`: MAX_BYTES per file, BACKUPS old ones kept."""
    return RotatingLogFile(Path(path))
