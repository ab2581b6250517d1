"""The audit trail's files: rotated sets of JSON lines, one for the security events and
one per device for its DICOM events, and the readers that merge them in time order.

Layout (next to `audit.jsonl`, the security set, which is also where every event went
before the sets were split, so an old trail is read as it is):

    audit.jsonl, audit.jsonl.1 ... .KEEP, audit.jsonl.lock     security/administrative
    audit-devices/NAME-HASH.jsonl, .1 ... .KEEP                one set per device
    audit-devices/lock                                         one flock for all of them

A device's set is named by its SPIFFE ID (never a patient identifier): the part after
`/device/` made filename-safe, and a hash of the whole ID so that two IDs never share a
set. Each set rotates at its own `max_bytes`, so one device's traffic only ever rotates
its own records; the number of device sets is bounded (`max_sets`): a new device beyond
it prunes the set idle longest, with a warning.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import heapq
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

try:
    import fcntl
except ImportError:  # Windows: the agent runs on Linux; there only the ends' tests load it
    fcntl = None  # type: ignore[assignment]

from relay.agent.audit.events import MAX_LINE_BYTES

log = logging.getLogger(__name__)

DEVICE_DIR_SUFFIX: Final = "-devices"
"""`audit.jsonl` -> `audit-devices/`: the directory of the device sets."""
SET_SUFFIX: Final = ".jsonl"
DEVICE_LOCK: Final = "lock"
DEFAULT_MAX_DEVICES: Final = 256
"""Device sets kept (config `audit.max_devices`). With the default 10 MiB x 11 files a
set, at most 257 x 110 MiB (~28 GiB) on disk if every device filled its own: size it to
the disk. A device beyond it prunes the set idle longest (logged as a warning)."""
MAX_LABEL_CHARS: Final = 48
"""Of the readable part of a device set's name (the device ID after `/device/`)."""
HASH_CHARS: Final = 16
"""Hex characters of the SHA-256 of the device ID in its set's name (64 bits)."""
READ_CHUNK: Final = 64 * 1024
"""Bytes a reader takes at a time; it reopens the file for each, so a merge of many sets
holds no file descriptor between chunks."""
MAX_READ_LINE: Final = 2 * MAX_LINE_BYTES
"""A longer line (none is written: events are at most MAX_LINE_BYTES) is skipped by the
readers, so that a damaged file cannot make them buffer without bound."""
_NUMBERED = re.compile(r"(?P<base>.+" + re.escape(SET_SUFFIX) + r")(?:\.(?P<n>\d+))?")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def device_dir(path: Path) -> Path:
    """The directory of the device sets of the trail whose security set is `path`."""
    return path.with_name(path.stem + DEVICE_DIR_SUFFIX)


def device_set_name(device: str) -> str:
    """The file name of `device`'s set: e.g. `main_ws1-0123456789abcdef.jsonl` for
    spiffe://td/device/main/ws1. Device IDs are chosen by IT, not patient data."""
    tail = device.split("/device/", 1)[1] if "/device/" in device else device
    label = _UNSAFE.sub("_", tail)[:MAX_LABEL_CHARS].strip(".") or "unknown"
    digest = hashlib.sha256(device.encode("utf-8")).hexdigest()[:HASH_CHARS]
    return f"{label}-{digest}{SET_SUFFIX}"


@contextlib.contextmanager
def flocked(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive flock on `lock_path` (created 0600): writers in several
    processes (the agent, the CLI) take turns, rotation included."""
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@dataclass(frozen=True)
class RotatedFile:
    """One set: `path` rotated at `max_bytes` into path.1 (newest) ... path.KEEP."""

    path: Path
    max_bytes: int
    keep: int

    def append(self, data: bytes) -> None:
        """Append `data` in one write, rotating first if it would not fit. Call under
        the set's flock. Raises OSError."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size > 0 and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.KEEP (the oldest is dropped)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.numbered(self.keep))
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.numbered(n), self.numbered(n + 1))
        os.replace(self.path, self.numbered(1))

    def numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")


class DeviceSets:
    """Each device's DICOM events in a set of its own under `directory` (mode 0700),
    each rotated at `max_bytes` with `keep` older files, at most `max_sets` sets.

    One flock serializes every device set's writes, rotations and pruning, across
    processes: a set is never pruned under a writer.
    """

    def __init__(self, directory: Path, *, max_bytes: int, keep: int, max_sets: int) -> None:
        if max_sets < 1:
            raise ValueError("max_sets must be at least 1")
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_sets = max_sets
        #: sets this writer pruned to make room for a new device
        self.pruned = 0

    def path_of(self, device: str) -> Path:
        """The file `device`'s events are appended to now."""
        return self.directory / device_set_name(device)

    def append(self, device: str, data: bytes) -> None:
        """Append `data` to `device`'s set (created, within the bound, if new). Raises
        OSError."""
        with contextlib.suppress(FileExistsError):
            self.directory.mkdir(mode=0o700)
        target = RotatedFile(self.path_of(device), self.max_bytes, self.keep)
        with flocked(self.directory / DEVICE_LOCK):
            if not target.path.exists():
                self._make_room(target.path.name)
            target.append(data)

    def _make_room(self, name: str) -> None:
        """Before set `name` is created: prune the sets idle longest until there is room
        for it. Under the flock."""
        sets = list_sets(self.directory)
        if name in sets:  # its current file was rotated away but the set exists
            return
        for victim in sorted(sets, key=lambda n: sets[n])[: max(0, len(sets) - self.max_sets + 1)]:
            self._prune(victim)

    def _prune(self, name: str) -> None:
        for file in set_files(self.directory / name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file)
        self.pruned += 1
        log.warning(
            "audit: the device set idle longest was deleted to make room for a new device;"
            " raise audit.max_devices to keep more",
            extra={"audit_set": name, "max_devices": self.max_sets},
        )


def list_sets(directory: Path) -> dict[str, float]:
    """The device sets in `directory`: set name -> the time of its last write."""
    sets: dict[str, float] = {}
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except (FileNotFoundError, NotADirectoryError):
        return sets
    for entry in entries:
        match = _NUMBERED.fullmatch(entry.name)
        if match is None:
            continue
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            continue
        base = match["base"]
        sets[base] = max(sets.get(base, mtime), mtime)
    return sets


def set_files(base: Path) -> list[Path]:
    """The files of the set `base` as they are now, newest first (base, base.1 ...)."""
    numbered = sorted(
        (p for p in base.parent.glob(glob.escape(base.name) + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
    )
    return [base, *numbered]


def trail_sets(path: Path, *, security: bool = True, devices: bool = True) -> list[Path]:
    """The sets of the trail whose security set is `path` (that one first)."""
    out = [path] if security else []
    if devices:
        directory = device_dir(path)
        out += [directory / name for name in sorted(list_sets(directory))]
    return out


# -- reading


_Ident = tuple[int, int]


def _ident(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino)


def _read_chunk(base: Path, path: Path, ident: _Ident, pos: int, size: int) -> bytes | None:
    """`size` bytes at `pos` of the file `ident` of set `base`, found again among the
    set's files if a rotation renamed it since; None once it is gone."""
    chunk = _read_if(path, ident, pos, size)
    if chunk is not None:
        return chunk
    for candidate in set_files(base):
        chunk = _read_if(candidate, ident, pos, size)
        if chunk is not None:
            return chunk
    return None


def _read_if(path: Path, ident: _Ident, pos: int, size: int) -> bytes | None:
    """`size` bytes at `pos` of `path` if it is the file `ident`, else None."""
    try:
        with open(path, "rb") as f:
            if _ident(os.fstat(f.fileno())) != ident:
                return None
            f.seek(pos)
            return f.read(size)
    except OSError:
        return None


def _snapshot(base: Path) -> list[tuple[Path, _Ident, int]]:
    """The files of set `base` now, newest first, each with its identity and size: a
    reader follows each file by identity through rotations and reads what it held."""
    out = []
    for path in set_files(base):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path, _ident(st), st.st_size))
    return out


def _forward(base: Path, path: Path, ident: _Ident, size: int) -> Iterator[bytes]:
    pos, tail, skipping = 0, b"", False
    while pos < size:
        chunk = _read_chunk(base, path, ident, pos, min(READ_CHUNK, size - pos))
        if not chunk:
            return
        pos += len(chunk)
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        for part in parts:
            if not skipping and 0 < len(part) <= MAX_READ_LINE:
                yield part
            skipping = False
        if len(tail) > MAX_READ_LINE:
            tail, skipping = b"", True
    if tail and not skipping:
        yield tail


def _backward(base: Path, path: Path, ident: _Ident, size: int) -> Iterator[bytes]:
    pos, head, skipping = size, b"", False
    while pos > 0:
        step = min(READ_CHUNK, pos)
        chunk = _read_chunk(base, path, ident, pos - step, step)
        if chunk is None or len(chunk) != step:
            return
        pos -= step
        parts = (chunk + head).split(b"\n")
        head = parts.pop(0)
        for part in reversed(parts):
            if not skipping and 0 < len(part) <= MAX_READ_LINE:
                yield part
            skipping = False
        if len(head) > MAX_READ_LINE:
            head, skipping = b"", True
    if head and not skipping:
        yield head


def _set_lines(base: Path, *, newest_first: bool) -> Iterator[bytes]:
    files = _snapshot(base)
    for path, ident, size in files if newest_first else reversed(files):
        if newest_first:
            yield from _backward(base, path, ident, size)
        else:
            yield from _forward(base, path, ident, size)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def event_time(event: dict[str, Any] | None) -> datetime | None:
    """The event's EventDateTime (UTC if it has no zone), or None."""
    ident = event.get("EventIdentification") if event is not None else None
    raw = ident.get("EventDateTime") if isinstance(ident, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
_LATEST: Final = datetime.max.replace(tzinfo=UTC)


def _keyed(base: Path, *, newest_first: bool) -> Iterator[tuple[datetime, dict[str, Any] | None]]:
    """(time, event) of each line of a set; a line without a time (not JSON: a torn
    write) takes the time before it, so that it does not hold its set back in a merge."""
    last = _LATEST if newest_first else _EARLIEST
    for line in _set_lines(base, newest_first=newest_first):
        event = _parse(line)
        last = event_time(event) or last
        yield last, event


def merged_events(sets: Iterable[Path], *, newest_first: bool) -> Iterator[dict[str, Any] | None]:
    """Every line of `sets` as an event (None for a line that is not a JSON object), in
    time order across the sets (equal times: in the order of `sets`)."""
    streams = [_keyed(base, newest_first=newest_first) for base in sets]
    for _, event in heapq.merge(*streams, key=lambda pair: pair[0], reverse=newest_first):
        yield event
