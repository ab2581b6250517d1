"""relay.ops.logfile: `--log-file` stays bounded without an external rotator."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relay.ops import logfile
from relay.ops.logfile import RotatingLogFile


def test_rotates_at_the_size_at_a_line_end_and_keeps_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    log = RotatingLogFile(path, max_bytes=100, backups=2)
    for n in range(40):
        log.write(f"line {n:03d} ")  # a line in two writes: never split across files
        log.write("x" * 20 + "\n")
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ws.log", "ws.log.1", "ws.log.2"]
    for p in tmp_path.iterdir():
        text = p.read_text(encoding="utf-8")
        assert len(text.encode()) < 100 + 30
        assert all(line.startswith("line ") and line.endswith("x") for line in text.splitlines())
    assert path.read_text().splitlines()[-1].startswith("line 039")


def test_an_oversized_file_from_before_is_rotated_at_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    path.write_text("old\n" * 50)
    log = RotatingLogFile(path, max_bytes=100)
    log.write("new\n")
    log.close()
    assert (tmp_path / "ws.log.1").read_text() == "old\n" * 50
    assert path.read_text() == "new\n"


def test_a_refused_rotation_keeps_appending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: another program holds the file open without sharing delete."""
    path = tmp_path / "ws.log"
    log = RotatingLogFile(path, max_bytes=10)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(32, "The process cannot access the file", str(src))

    monkeypatch.setattr(os, "rename", refuse)
    for n in range(5):
        log.write(f"line {n}\n")
    monkeypatch.undo()
    log.close()
    assert path.read_text().splitlines() == [f"line {n}" for n in range(5)]


def test_log_records_go_through_it(tmp_path: Path) -> None:
    log = RotatingLogFile(tmp_path / "ws.log", max_bytes=1000)
    handler = logging.StreamHandler(log)
    logger = logging.getLogger("tests.logfile")
    logger.addHandler(handler)
    try:
        logger.warning("caf\u00e9 \u5c71")
    finally:
        logger.removeHandler(handler)
        log.close()
    assert (tmp_path / "ws.log").read_text(encoding="utf-8") == "caf\u00e9 \u5c71\n"


def test_the_bounds() -> None:
    assert logfile.MAX_BYTES == 10 * 1024 * 1024 and logfile.BACKUPS == 5
