"""A config file that is a FIFO, to hold a role's reload in its read for as long as a test
wants (relay.ops.configfile gives a FIFO PIPE_DEADLINE to be written): the reload has
begun once a reader holds the FIFO open, and it goes on once the test writes the file.
POSIX only (os.mkfifo); the tests that use it skip elsewhere."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

__all__ = ["HAS_FIFO", "feed", "held_reader", "held_reader_async", "make_fifo"]

HAS_FIFO = hasattr(os, "mkfifo")
WAIT = 30.0
POLL = 0.01


def make_fifo(config: Path) -> None:
    """Put a FIFO where the config file was: the role's next reload waits for a writer."""
    config.unlink()
    os.mkfifo(config)


def _open_writer(fifo: Path) -> int | None:
    """The FIFO's write end if a reader has it open now (a reload reading it), else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
            raise
        return None


def held_reader(fifo: Path, within: float = WAIT) -> int:
    """Wait until a reload opened `fifo`; its write end (the reload waits until `feed`)."""
    deadline = time.monotonic() + within
    while (fd := _open_writer(fifo)) is None:
        assert time.monotonic() < deadline, f"no reload opened {fifo}"
        time.sleep(POLL)
    return fd


async def held_reader_async(fifo: Path, within: float = WAIT) -> int:
    """`held_reader` for a test whose loop runs the role: it keeps the loop going."""
    async with asyncio.timeout(within):
        while (fd := _open_writer(fifo)) is None:  # noqa: ASYNC110 - another process's open
            await asyncio.sleep(POLL)
    return fd


def feed(fd: int, text: str) -> None:
    """Write the whole config into the held FIFO and close it: the reload reads it. Wait
    for that reload to be over before `held_reader` looks for the next one: until it
    closes the FIFO, its open read end looks like the next reader."""
    os.write(fd, text.encode())
    os.close(fd)
