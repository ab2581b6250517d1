"""The agent's memory of its PACS, kept across restarts in `state_dir/pacs-memory.json`.

What the PACS's recent studies held (SOP classes, transfer syntaxes) and whether its
retrieves give their counts (relay.dicom.survey.StorageMemory) decide what a C-GET
proposes and whether a survey runs beside it. An agent that forgot them on a restart made
its first retrieval propose 127 contexts (40-60 ms more against a pynetdicom PACS) and run
a survey. The file holds UIDs of SOP classes and transfer syntaxes and the PACS's
address, no patient data. It is read at start: a missing, unreadable, foreign (another
PACS) or malformed file is an empty memory, which the agent relearns. It is written when
the memory changed, at most every SAVE_EVERY seconds and at stop, atomically: a crash
leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from relay.dicom.pacs_target import PacsTarget
from relay.dicom.survey import StorageMemory

__all__ = ["MAX_FILE", "MEMORY_FILE", "SAVE_EVERY", "kept", "load", "pacs_key", "save"]

log = logging.getLogger(__name__)

MEMORY_FILE: Final = "pacs-memory.json"
MAX_FILE: Final = 64 * 1024  # bytes read at most (a full memory is under 4 KiB)
SAVE_EVERY: Final = 60.0  # seconds between checks for a changed memory
VERSION: Final = 1
# One writer at a time: a save whose task was cancelled still runs on its thread when
# the last save at stop begins.
_WRITING = threading.Lock()


def pacs_key(pacs: PacsTarget) -> str:
    """Which PACS a memory is of: another address or AE title starts empty."""
    return f"{pacs.ae_title}@{pacs.host}:{pacs.port}"


def load(path: Path, key: str, memory: StorageMemory) -> bool:
    """Restore `memory` from `path` if it is a memory of PACS `key`; never raises."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot read %s (%s); relearning what the PACS holds", path, exc.strerror)
        return False
    try:
        if len(data) > MAX_FILE:
            raise ValueError(f"larger than {MAX_FILE} bytes")
        saved = json.loads(data)
        if not isinstance(saved, dict) or saved.get("v") != VERSION:
            raise ValueError(f"not a version {VERSION} memory")
        if saved.get("pacs") != key:
            log.info("%s is of another PACS; relearning what this one holds", path)
            return False
        memory.restore(saved)
    except ValueError as exc:  # JSON and UTF-8 errors included
        log.warning("ignoring %s: %s; relearning what the PACS holds", path, exc)
        return False
    return True


def save(path: Path, key: str, saved: dict[str, list[str]]) -> None:
    """Write a `StorageMemory.snapshot()` of PACS `key` to `path`, atomically; raises
    OSError."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = json.dumps({"v": VERSION, "pacs": key, **saved}, indent=1).encode()
    with _WRITING:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextlib.asynccontextmanager
async def kept(
    state_dir: Path, pacs: PacsTarget, memory: StorageMemory, every: float = SAVE_EVERY
) -> AsyncIterator[None]:
    """Load `memory` now, save it while it changes and once more on the way out."""
    path, key = state_dir / MEMORY_FILE, pacs_key(pacs)
    await asyncio.to_thread(load, path, key, memory)
    written = memory.snapshot()
    failing = False

    async def save_if_changed() -> None:
        nonlocal written, failing
        now = memory.snapshot()
        if now == written:
            return
        try:
            await asyncio.to_thread(save, path, key, now)
        except OSError as exc:
            if not failing:  # once, not every minute
                log.warning("cannot write %s (%s)", path, exc.strerror or exc)
            failing = True
            return
        written, failing = now, False

    async def keep() -> None:
        while True:
            await asyncio.sleep(every)
            await save_if_changed()

    task = asyncio.create_task(keep(), name="pacs-memory")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await save_if_changed()
