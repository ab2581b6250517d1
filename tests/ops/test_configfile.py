"""relay.ops.configfile: what a config file may be on disk (a pipe, an encoding)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.ops import configfile
from relay.ops.config import ConfigError, Reader
from relay.ops.configfile import open_config

CONFIG = b"site: main\nlog_level: debug\n"

needs_fifo = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(os, "mkfifo"), reason="no FIFOs among files"
)


def outcome_within(seconds: float, load: Callable[[], Reader]) -> Reader | BaseException:
    """What `load` returned or raised, or fail the test if it is still at it after
    `seconds` (a daemon thread: a loader stuck for ever does not hold pytest's exit)."""
    result: list[Reader | BaseException] = []

    def run() -> None:
        try:
            result.append(load())
        except BaseException as exc:  # handed to the test as it is
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not result:
        pytest.fail(f"the loader still waits after {seconds}s")
    return result[0]


@pytest.fixture
def fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(configfile, "PIPE_DEADLINE", 0.3)
    path = tmp_path / "agent.yaml"
    os.mkfifo(path)
    yield path
    # wake a reader the code under test might have left blocked in open()
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def write_later(path: Path, *parts: bytes, hold: float = 0.0) -> threading.Thread:
    """A writer that opens the FIFO after the loader, writes `parts` a moment apart, and
    keeps it open `hold` seconds more before closing."""

    def run() -> None:
        time.sleep(0.05)
        with open(path, "wb", buffering=0) as f:
            for part in parts:
                f.write(part)
                time.sleep(0.02)
            time.sleep(hold)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@needs_fifo
def test_a_fifo_nobody_writes_is_one_line_not_a_hang(fifo: Path) -> None:
    started = time.monotonic()
    error = outcome_within(5.0, lambda: open_config(fifo))
    assert isinstance(error, ConfigError), error
    assert str(error) == f"{fifo}: a pipe (FIFO) that nothing wrote to within 0.3s: not used"
    assert time.monotonic() - started < 2.0


@needs_fifo
def test_a_fifo_with_a_writer_is_read_to_its_end(fifo: Path) -> None:
    write_later(fifo, CONFIG[:8], CONFIG[8:])
    reader = outcome_within(5.0, lambda: open_config(fifo))
    assert isinstance(reader, Reader), reader
    assert (reader.text("site"), reader.text("log_level")) == ("main", "debug")


@needs_fifo
def test_a_writer_that_stops_half_way_is_not_taken_for_the_whole_file(fifo: Path) -> None:
    writer = write_later(fifo, CONFIG[:8], hold=0.5)
    error = outcome_within(5.0, lambda: open_config(fifo))
    assert isinstance(error, ConfigError), error
    assert "writer did not finish within 0.3s (8 bytes came)" in str(error)
    writer.join()


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd")
def test_a_process_substitution_still_loads() -> None:
    """`--config <(sops -d agent.yaml)`: the shell hands over /dev/fd/N, a pipe."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, CONFIG)
        os.close(write_end)
        reader = outcome_within(5.0, lambda: open_config(f"/dev/fd/{read_end}"))
    finally:
        os.close(read_end)
    assert isinstance(reader, Reader), reader
    assert reader.text("site") == "main"


NOTEPAD_TEXT = "site: main\r\nname: Zürich\r\n"  # Notepad: CRLF, one non-ASCII letter


@pytest.mark.parametrize(
    "encoded",
    [
        b"\xff\xfe" + NOTEPAD_TEXT.encode("utf-16-le"),  # Notepad's "Unicode"
        b"\xfe\xff" + NOTEPAD_TEXT.encode("utf-16-be"),  # "Unicode big endian"
        b"\xef\xbb\xbf" + NOTEPAD_TEXT.encode(),  # "UTF-8 with BOM", PowerShell 5.1
        b"\xff\xfe\x00\x00" + NOTEPAD_TEXT.encode("utf-32-le"),
        NOTEPAD_TEXT.encode(),
    ],
    ids=["utf-16-le", "utf-16-be", "utf-8-bom", "utf-32-le", "utf-8"],
)
def test_a_config_is_decoded_by_its_byte_order_mark(tmp_path: Path, encoded: bytes) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(encoded)
    reader = open_config(path)
    assert (reader.text("site"), reader.text("name")) == ("main", "Zürich")


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (NOTEPAD_TEXT.encode("utf-16-le"), "a NUL byte (byte 1; UTF-16 without a"),
        (b"\xff\xfe" + NOTEPAD_TEXT.encode("utf-16-le")[:-1], "not UTF-16 text (byte 52)"),
        (b"site: \xff\n", "not UTF-8 text (byte 6)"),
    ],
    ids=["utf-16-without-bom", "utf-16-cut-short", "latin-1"],
)
def test_text_that_cannot_be_read_says_save_it_as_utf8(
    tmp_path: Path, encoded: bytes, message: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(encoded)
    with pytest.raises(ConfigError) as info:
        open_config(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert str(info.value).endswith(": save it as UTF-8")
