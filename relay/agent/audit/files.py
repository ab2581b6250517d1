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
it prunes the set idle longest, with a warning, and hands the writer what it pruned
(`PrunedSet`) to audit in the security set once the device sets' flock is released.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
the disk. A device beyond it prunes the set idle longest (logged as a warning, and
audited in the security set: `AuditLog`'s "audit_pruned")."""
MAX_LABEL_CHARS: Final = 48
"""Of the readable part of a device set's name (the device ID after `/device/`)."""
HASH_CHARS: Final = 16
"""Hex characters of the SHA-256 of the device ID in its set's name (64 bits)."""
READ_CHUNK: Final = 64 * 1024
"""Bytes a reader takes at a time; it reopens the file for each, so a merge of many sets
holds no file descriptor between chunks."""
FIRST_CHUNK: Final = 4 * 1024
"""A reader's first read of a file (opened, or resumed after being parked), doubling up
to READ_CHUNK: a set the merge takes one event from costs one small read."""
MAX_OPEN_SETS: Final = 32
"""Sets a merge reads from at once, each holding at most READ_CHUNK + MAX_READ_LINE of
buffers (~6 MiB in all whatever the number of sets): opening one more parks the open
set whose next line merges last (its buffers dropped, its place kept) until the merge
reaches it."""
MTIME_SLACK: Final = timedelta(minutes=10)
"""A set's events are no newer than its last write (each event is written as it
happens) plus this (coarse file clocks, a clock stepped back a little): a newest-first
merge opens a set only once its front reaches that time, so a page opens the sets
written recently, not every one. An event stamped later still (a clock stepped back
further) comes later in the order than its time says; none is lost."""
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


@dataclass(frozen=True, slots=True)
class PrunedSet:
    """A device set deleted to make room for a new device: what its audit record says
    (names and counts only, never a line of it)."""

    name: str
    #: The device ID its newest file's first event names, if that ID is the one the
    #: set is named for (else None: the name alone says which set went).
    device: str | None
    files: int  # files deleted
    last_write: float | None  # the set's last write (epoch seconds), as listed


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

    def append(self, device: str, data: bytes, pruned: list[PrunedSet] | None = None) -> None:
        """Append `data` to `device`'s set (created, within the bound, if new). Sets
        pruned to make room are added to `pruned` as they go, even if this then raises,
        for the caller to audit after the flock is released. Raises OSError."""
        with contextlib.suppress(FileExistsError):
            self.directory.mkdir(mode=0o700)
        target = RotatedFile(self.path_of(device), self.max_bytes, self.keep)
        with flocked(self.directory / DEVICE_LOCK):
            if not target.path.exists():
                self._make_room(target.path.name, [] if pruned is None else pruned)
            target.append(data)

    def _make_room(self, name: str, pruned: list[PrunedSet]) -> None:
        """Before set `name` is created: prune the sets idle longest until there is room
        for it. Under the flock."""
        sets = scan_sets(self.directory)
        if name in sets:  # its current file was rotated away but the set exists
            return
        idlest = sorted(sets.values(), key=lambda s: s.mtime or 0.0)
        for victim in idlest[: max(0, len(sets) - self.max_sets + 1)]:
            self._prune(victim, pruned)

    def _prune(self, victim: SetListing, pruned: list[PrunedSet]) -> None:
        """Delete `victim`'s files; what went is added to `pruned` even if a file cannot
        be deleted (the OSError then goes on up)."""
        device = device_of_set(victim)
        deleted = 0
        try:
            for file in victim.paths():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file)
                    deleted += 1
        finally:
            if deleted:
                self.pruned += 1
                pruned.append(PrunedSet(victim.name, device, deleted, victim.mtime))
        log.warning(
            "audit: the device set idle longest was deleted to make room for a new device;"
            " raise audit.max_devices to keep more",
            extra={"audit_set": victim.name, "files": deleted, "max_devices": self.max_sets},
        )


def device_of_set(listing: SetListing) -> str | None:
    """The device whose set `listing` is: the requestor of its newest file's first event,
    if `device_set_name` of it is the set's name (a damaged or foreign line names none).
    One read of at most MAX_READ_LINE bytes; nothing else of the line is kept."""
    for path in listing.paths():
        try:
            with open(path, "rb") as f:
                head = f.read(MAX_READ_LINE)
        except OSError:
            continue  # gone since the listing: the next (older) file
        event = _parse(head.split(b"\n", 1)[0])
        participants = event.get("ActiveParticipant") if event is not None else None
        for p in participants if isinstance(participants, list) else []:
            if isinstance(p, dict) and p.get("UserIsRequestor"):
                user = p.get("UserID")
                if isinstance(user, str) and device_set_name(user) == listing.name:
                    return user
                return None
        return None
    return None


_Ident = tuple[int, int]


def _ident(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class SetListing:
    """One set as a single directory listing found it: its current file's identity,
    size and last write (None if it has none now), and its rotated files' numbers.
    Small: a page lists every set, and reads (stats) only those the merge opens."""

    directory: Path
    name: str
    current: tuple[_Ident, int] | None = None
    mtime: float | None = None  # the time of its last write (its newest file's mtime)
    numbers: tuple[int, ...] = ()  # ascending: newest first

    @property
    def base(self) -> Path:
        return self.directory / self.name

    def numbered(self, n: int) -> Path:
        return self.directory / f"{self.name}.{n}"

    def paths(self) -> list[Path]:
        """The set's files as listed, newest first (base, base.1 ...)."""
        return [self.base, *(self.numbered(n) for n in self.numbers)]

    def snapshot(self) -> list[_FileRef]:
        """The files to read, newest first: the current file as listed (a reader stops at
        its listed size) and the rotated ones as they are now. A rotation since the
        listing renamed the current file (kept once, by identity) and shifted the
        others up a number: the numbers past the listed ones are looked at too."""
        out: list[_FileRef] = []
        seen: set[_Ident] = set()
        if self.current is not None:
            ident, size = self.current
            out.append(_FileRef(self.base, ident, size))
            seen.add(ident)
        last = max(self.numbers, default=0)
        for n in itertools.count(1):
            path = self.numbered(n)
            try:
                st = os.stat(path)
            except OSError:
                if n > last:  # past the listed numbers, and no file shifted there
                    break
                continue
            if _ident(st) not in seen:
                seen.add(_ident(st))
                out.append(_FileRef(path, _ident(st), st.st_size))
        return out


def scan_sets(directory: Path, *, only: str | None = None) -> dict[str, SetListing]:
    """The sets in `directory` (only set `only` if given) from one scandir: each set's
    current file is stat'ed, its rotated files only if it has no current file."""
    names: dict[str, list[int]] = {}
    try:
        with os.scandir(directory) as listing:
            for entry in listing:
                found = _member(entry.name, only)
                if found is None:
                    continue
                base, n = found
                numbers = names.setdefault(base, [])
                if n is not None:
                    numbers.append(n)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {name: _listed(directory, name, sorted(numbers)) for name, numbers in names.items()}


def _member(name: str, only: str | None) -> tuple[str, int | None] | None:
    """(set, rotation number or None) of a directory entry, or None if it is none of
    ours. `only` names the one set wanted, whatever its name ends with (the security
    set is a path the caller gives); without it, sets end with SET_SUFFIX."""
    if only is None:
        match = _NUMBERED.fullmatch(name)
        if match is None:
            return None
        return match["base"], int(match["n"]) if match["n"] is not None else None
    if name == only:
        return only, None
    rest = name.removeprefix(only + ".")
    if rest != name and rest.isdigit() and rest.isascii():
        return only, int(rest)
    return None


def _listed(directory: Path, name: str, numbers: list[int]) -> SetListing:
    listing = SetListing(directory, name, numbers=tuple(numbers))
    try:
        st = os.stat(listing.base)
    except OSError:
        mtimes = []
        for n in numbers:  # no current file (rare): its last write is a rotated one's
            with contextlib.suppress(OSError):
                mtimes.append(os.stat(listing.numbered(n)).st_mtime)
        return SetListing(directory, name, None, max(mtimes, default=None), tuple(numbers))
    return SetListing(directory, name, (_ident(st), st.st_size), st.st_mtime, tuple(numbers))


def listing_of(base: Path) -> SetListing:
    """The set `base` as it is now (one scandir of its directory)."""
    found = scan_sets(base.parent, only=base.name).get(base.name)
    return found if found is not None else SetListing(base.parent, base.name)


def list_sets(directory: Path) -> dict[str, float]:
    """The device sets in `directory`: set name -> the time of its last write."""
    return {name: s.mtime or 0.0 for name, s in scan_sets(directory).items()}


def set_files(base: Path) -> list[Path]:
    """The files of the set `base` as they are now, newest first (base, base.1 ...)."""
    return listing_of(base).paths()


def trail_sets(path: Path, *, security: bool = True, devices: bool = True) -> list[SetListing]:
    """The sets of the trail whose security set is `path` (that one first), listed by
    one scandir of each directory."""
    out = [listing_of(path)] if security else []
    if devices:
        found = scan_sets(device_dir(path))
        out += [found[name] for name in sorted(found)]
    return out


# -- reading


@dataclass(slots=True)
class _FileRef:
    """A file of a set being read: followed by identity, read up to `size` (what it
    held when listed); `path` is updated when a rotation renamed it."""

    path: Path
    ident: _Ident
    size: int


def _read_chunk(base: Path, ref: _FileRef, pos: int, size: int) -> bytes | None:
    """`size` bytes at `pos` of file `ref` of set `base`, found again among the set's
    files if a rotation renamed it since; None once it is gone."""
    chunk = _read_if(ref.path, ref.ident, pos, size)
    if chunk is not None:
        return chunk
    for candidate in set_files(base):
        chunk = _read_if(candidate, ref.ident, pos, size)
        if chunk is not None:
            ref.path = candidate  # the next chunks: read there at once
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


def _steps() -> Iterator[int]:
    """Bytes a reader takes at each read: FIRST_CHUNK, doubling up to READ_CHUNK."""
    step = min(FIRST_CHUNK, READ_CHUNK)
    while True:
        yield step
        step = min(2 * step, READ_CHUNK)


def _forward(base: Path, ref: _FileRef, start: int) -> Iterator[tuple[bytes, int]]:
    """The lines of `ref` from offset `start` on, each with its start offset (where a
    parked reader resumes to read it again)."""
    pos, tail, tail_at, skipping = start, b"", start, False
    steps = _steps()
    while pos < ref.size:
        chunk = _read_chunk(base, ref, pos, min(next(steps), ref.size - pos))
        if not chunk:
            return
        pos += len(chunk)
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        at = tail_at
        for part in parts:
            if not skipping and 0 < len(part) <= MAX_READ_LINE:
                yield part, at
            skipping = False
            at += len(part) + 1
        tail_at = at
        if len(tail) > MAX_READ_LINE:
            tail, tail_at, skipping = b"", pos, True
    if tail and not skipping:
        yield tail, tail_at


def _backward(base: Path, ref: _FileRef, end: int) -> Iterator[tuple[bytes, int]]:
    """The lines of `ref` before offset `end`, last first, each with its end offset
    (where a parked reader resumes to read it again)."""
    pos, head, head_end, skipping = end, b"", end, False
    steps = _steps()
    while pos > 0:
        step = min(next(steps), pos)
        chunk = _read_chunk(base, ref, pos - step, step)
        if chunk is None or len(chunk) != step:
            return
        pos -= step
        parts = (chunk + head).split(b"\n")
        head = parts.pop(0)
        at = head_end
        for part in reversed(parts):
            if not skipping and 0 < len(part) <= MAX_READ_LINE:
                yield part, at
            skipping = False
            at -= len(part) + 1
        head_end = at
        if len(head) > MAX_READ_LINE:
            head, head_end, skipping = b"", pos, True
    if head and not skipping:
        yield head, head_end


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
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Head:
    """A reader's next line, read but not yet merged, and where to read it again."""

    at: datetime
    event: dict[str, Any] | None
    index: int  # its file in the reader's snapshot
    resume: int  # its offset: where a resumed reader reads it again
    before: datetime  # the time carried to it (from the line before)


class _SetReader:
    """One set's lines in merge order, each keyed by its time. It can be parked (its
    buffers dropped, its place kept: a few numbers) and resumed there, so a merge of
    any number of sets holds at most MAX_OPEN_SETS sets' buffers."""

    __slots__ = ("_files", "_index", "_last", "_lines", "_resume", "head", "listing", "newest")

    def __init__(self, listing: SetListing, *, newest_first: bool) -> None:
        self.listing = listing
        self.newest = newest_first
        self.head: _Head | None = None
        self._files: list[_FileRef] | None = None  # taken when first opened
        self._index = 0
        self._resume: int | None = None
        self._lines: Iterator[tuple[bytes, int]] | None = None
        # A line without a time (not JSON: a torn write) takes the time before it, so
        # that it does not hold its set back in a merge.
        self._last = _LATEST if newest_first else _EARLIEST

    def bound(self) -> datetime:
        """No line of the set not yet merged is beyond this (newer, in a newest-first
        merge): its head's time, else (never opened) its last write + MTIME_SLACK."""
        if self.head is not None:
            return self.head.at
        if not self.newest:
            return _EARLIEST
        mtime = self.listing.mtime
        if mtime is None:
            return _LATEST
        return datetime.fromtimestamp(mtime, UTC) + MTIME_SLACK

    def advance(self) -> bool:
        """Read the next line into `head` (opening or resuming the set); False at its end."""
        if self._files is None:
            files = self.listing.snapshot()
            self._files = files if self.newest else files[::-1]
        while self._index < len(self._files):
            if self._lines is None:
                self._lines = self._open(self._files[self._index], self._resume)
                self._resume = None
            found = next(self._lines, None)
            if found is not None:
                line, resume = found
                event = _parse(line)
                before, self._last = self._last, event_time(event) or self._last
                self.head = _Head(self._last, event, self._index, resume, before)
                return True
            self._lines = None
            self._index += 1
        self.head = None
        return False

    def _open(self, ref: _FileRef, resume: int | None) -> Iterator[tuple[bytes, int]]:
        base = self.listing.base
        if self.newest:
            return _backward(base, ref, ref.size if resume is None else resume)
        return _forward(base, ref, 0 if resume is None else resume)

    def park(self) -> None:
        """Drop the buffers; the head, not merged yet, is read again when resumed."""
        head = self.head
        if head is None:
            return
        self._index, self._resume, self._last = head.index, head.resume, head.before
        self._lines = None
        self.head = None


def _rank(at: datetime, newest_first: bool) -> int:
    """An exact integer order of times: smaller merges first."""
    micros = (at - _EPOCH) // _MICROSECOND
    return -micros if newest_first else micros


def merged_events(
    sets: Iterable[Path | SetListing], *, newest_first: bool
) -> Iterator[dict[str, Any] | None]:
    """Every line of `sets` as an event (None for a line that is not a JSON object), in
    time order across the sets (equal times: in the order of `sets`).

    A set is opened only when the merge reaches its bound (`_SetReader.bound`: in a
    newest-first merge, its last write), and at most MAX_OPEN_SETS are read at once:
    opening one more parks the open set whose next line merges last. Memory and reads
    per line do not grow with the number of sets, only the listing (a few numbers a set).
    """
    readers = [
        _SetReader(s if isinstance(s, SetListing) else listing_of(s), newest_first=newest_first)
        for s in sets
    ]
    # (rank, order, reader): `pending` by bound (not open, or parked), `active` by head.
    pending = [(_rank(r.bound(), newest_first), n, r) for n, r in enumerate(readers)]
    heapq.heapify(pending)
    active: list[tuple[int, int, _SetReader]] = []
    while True:
        while pending and (not active or pending[0][:2] <= active[0][:2]):
            _, order, reader = heapq.heappop(pending)
            if reader.advance():
                _push_active(active, pending, (_rank(reader.bound(), newest_first), order, reader))
        if not active:
            return
        _, order, reader = heapq.heappop(active)
        assert reader.head is not None
        event = reader.head.event
        if reader.advance():
            heapq.heappush(active, (_rank(reader.bound(), newest_first), order, reader))
        yield event


def _push_active(
    active: list[tuple[int, int, _SetReader]],
    pending: list[tuple[int, int, _SetReader]],
    entry: tuple[int, int, _SetReader],
) -> None:
    """Add a reader to the open ones; beyond MAX_OPEN_SETS, park the one that merges
    last (its head is its exact bound in `pending`)."""
    heapq.heappush(active, entry)
    if len(active) <= MAX_OPEN_SETS:
        return
    last = max(range(len(active)), key=lambda i: active[i][:2])
    rank, order, reader = active[last]
    active[last] = active[-1]
    active.pop()
    heapq.heapify(active)
    reader.park()
    heapq.heappush(pending, (rank, order, reader))
