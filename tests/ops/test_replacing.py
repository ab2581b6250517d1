"""relay.ops.replacing: Windows' transient PermissionError on a rename is ridden out."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.ops import replacing


def flaky_replace(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """os.replace refuses `failures` times (a scanner holds the file), then works."""
    real: Callable[..., None] = os.replace
    calls: list[str] = []

    def replace(src: object, dst: object) -> None:
        calls.append(str(dst))
        if len(calls) <= failures:
            raise PermissionError(32, "The process cannot access the file", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_windows_retries_a_refused_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    calls = flaky_replace(monkeypatch, failures=2)
    (tmp_path / "new").write_bytes(b"x")
    replacing.replace(tmp_path / "new", tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"x" and len(calls) == 3


def test_windows_gives_up_after_about_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    now = [0.0]
    monkeypatch.setattr("relay.ops.replacing.time.monotonic", lambda: now[0])
    monkeypatch.setattr("relay.ops.replacing.time.sleep", lambda s: now.__setitem__(0, now[0] + s))
    calls = flaky_replace(monkeypatch, failures=1000)
    with pytest.raises(PermissionError):
        replacing.replace(tmp_path / "new", tmp_path / "file")
    assert replacing.RETRY_FOR - 0.25 <= now[0] <= replacing.RETRY_FOR
    assert 3 <= len(calls) <= 12


def test_elsewhere_one_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    calls = flaky_replace(monkeypatch, failures=1)
    with pytest.raises(PermissionError):
        replacing.replace(tmp_path / "new", tmp_path / "file")
    assert len(calls) == 1


def test_other_errors_are_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(FileNotFoundError):
        replacing.replace(tmp_path / "missing", tmp_path / "file")
