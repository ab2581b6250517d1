"""The OS lock that keeps one workstation per state directory (relay.ops.instancelock)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ops import instancelock
from relay.ops.instancelock import InstanceLock, InstanceLocked

HOLD = """
import sys, time
from pathlib import Path
from relay.ops.instancelock import InstanceLock
lock = InstanceLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first, second = InstanceLock(path), InstanceLock(path)
    first.acquire()
    with pytest.raises(InstanceLocked, match=r"x\.lock is locked by another process"):
        second.acquire()
    assert first.held and not second.held
    first.release()
    with second:
        assert second.held
    assert not second.held
    first.acquire()  # released on leaving the block
    first.release()


def test_the_lock_of_a_process_that_died_is_free_at_once(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InstanceLocked):
            InstanceLock(path).acquire()
    finally:
        holder.kill()  # a crash: nobody releases anything
        holder.wait(10)
    with InstanceLock(path) as lock:
        assert lock.held
    assert path.exists()  # the file stays; only the lock is gone


def test_a_file_system_without_locks_is_not_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A home directory on a network share whose file system refuses flock (ENOLCK,
    EOPNOTSUPP): that was "locked by another process", and the user looked for a second
    workstation that did not exist."""

    def no_locks_here(fd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(instancelock, "_lock", no_locks_here)
    lock = InstanceLock(tmp_path / "x.lock")
    with pytest.raises(OSError) as info:
        lock.acquire()
    assert not isinstance(info.value, InstanceLocked) and info.value.errno == errno.ENOLCK
    assert not lock.held
