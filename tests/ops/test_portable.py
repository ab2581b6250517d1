"""What the ends need of the platform: the loop, signals, private files (and Windows ACLs).

These run in the normal lane and again in the portable lane (tests/portable), where
uvloop, SIGHUP and loop signal handlers are gone; the Windows-only ones run on the hosted
Windows runner (.github/workflows/ends-portable.yml).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.ops import control, privatefiles, runtime, winacl
from relay.ops.signals import handling_signals
from relay.trust import pki
from tests.ends_helpers import write_readable_by_others as _readable_by_others

LANE = os.environ.get("RELAY_PORTABLE_LANE_ACTIVE") == "1"
WINDOWS = sys.platform == "win32"
USER = "S-1-5-21-1004336348-1177238915-682003330-1001"


def _uvloop_importable() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# --- the loop ---------------------------------------------------------------------------


def test_run_loop_uses_uvloop_only_where_it_can_be_imported() -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    runtime.run_loop(main())
    name, _ = runtime.loop_factory()
    if _uvloop_importable():
        assert (name, seen[0].split(".")[0]) == ("uvloop", "uvloop")
    else:
        assert (name, seen[0].split(".")[0]) == ("asyncio", "asyncio")
    if LANE:
        assert name == "asyncio"


# --- signals ----------------------------------------------------------------------------


async def test_ctrl_c_stops_through_whichever_mechanism_exists() -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    before = signal.getsignal(signal.SIGINT)
    with handling_signals(loop, stop=stopped.set) as names:
        assert "SIGINT" in names and "SIGTERM" in names
        signal.raise_signal(signal.SIGINT)
        await asyncio.wait_for(stopped.wait(), 10)
    if LANE or WINDOWS:  # signal.signal handlers: what was there comes back
        assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here (Windows, the lane)")
async def test_sighup_reloads_where_it_exists() -> None:
    reloaded = asyncio.Event()
    with handling_signals(asyncio.get_running_loop(), stop=lambda: None, reload=reloaded.set):
        signal.raise_signal(signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), 10)


async def test_without_sighup_nothing_is_installed_for_reload() -> None:
    with handling_signals(asyncio.get_running_loop(), stop=lambda: None, reload=lambda: None) as n:
        assert ("SIGHUP" in n) == hasattr(signal, "SIGHUP")
        assert ("SIGBREAK" in n) == WINDOWS  # Ctrl-Break
    if LANE:
        assert not hasattr(signal, "SIGHUP")


# --- private files ----------------------------------------------------------------------


def test_a_private_file_passes_the_check(tmp_path: Path) -> None:
    path = tmp_path / "key"
    os.close(privatefiles.create_private(path))
    privatefiles.check_private(path)


def test_protect_makes_a_file_private(tmp_path: Path) -> None:
    path = tmp_path / "key"
    _readable_by_others(path)
    with pytest.raises(privatefiles.PrivateFileError):
        privatefiles.check_private(path)
    privatefiles.protect(path)
    privatefiles.check_private(path)


def test_a_key_others_may_read_is_refused_naming_it_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    _readable_by_others(path)
    with pytest.raises(privatefiles.PrivateFileError) as info:
        privatefiles.check_private(path, "device key")
    message = str(info.value)
    assert "\n" not in message
    assert f"the device key {path} is not private" in message
    assert message.endswith(privatefiles.fix_command(path))
    assert ("Set-Acl" if WINDOWS else "chmod 600") in message


def test_the_fix_command_works(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    _readable_by_others(path)
    command = privatefiles.fix_command(path)
    shell = ["powershell", "-NoProfile", "-Command", command] if WINDOWS else ["sh", "-c", command]
    subprocess.run(shell, check=True, capture_output=True)
    privatefiles.check_private(path)


@pytest.mark.skipif(not WINDOWS, reason="Windows access lists")
def test_the_fix_command_removes_other_accounts_explicit_entries(tmp_path: Path) -> None:
    """`icacls /inheritance:r /grant:r` kept this entry, and the check refused again."""
    path = tmp_path / "device.key"
    path.write_bytes(b"secret")
    subprocess.run(["icacls", str(path), "/grant", "*S-1-5-32-545:R"], check=True)
    with pytest.raises(privatefiles.PrivateFileError):
        privatefiles.check_private(path)
    command = privatefiles.fix_command(path)
    subprocess.run(["powershell", "-NoProfile", "-Command", command], check=True)
    privatefiles.check_private(path)


def test_the_windows_fix_replaces_the_whole_access_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new protected list with one entry: not icacls, which keeps explicit entries."""
    monkeypatch.setattr(privatefiles, "_WINDOWS", True)
    monkeypatch.setenv("USERNAME", "ana")
    monkeypatch.setenv("USERDOMAIN", "HOSP")
    path = tmp_path / "it's" / "device.key"
    command = privatefiles.fix_command(path)
    assert "icacls" not in command and "Get-Acl" not in command  # nothing of the old list
    assert command.startswith("$a = New-Object Security.AccessControl.FileSecurity; ")
    assert "$a.SetAccessRuleProtection($true, $false); " in command  # inheritance cut off
    assert command.count("AddAccessRule(") == 1
    assert "FileSystemAccessRule('HOSP\\ana', 'FullControl', 'Allow')" in command
    assert command.endswith(
        f"Set-Acl -LiteralPath '{str(path).replace(chr(39), 2 * chr(39))}' -AclObject $a"
    )
    assert privatefiles.fix_shell() == "PowerShell"
    monkeypatch.delenv("USERNAME")
    assert "WindowsIdentity]::GetCurrent().User, 'FullControl'" in privatefiles.fix_command(path)


def test_a_private_directory(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    privatefiles.protect(directory, directory=True)
    privatefiles.check_private(directory, "state directory")


# --- private files on Windows, simulated -----------------------------------------------


class SimulatedAcls:
    """What matters of NTFS here, on any platform: a new file takes the DACL its folder
    passes on (readable by others, unless the folder was made private first), keeps its
    DACL when moved, and Windows checks access when a handle is opened."""

    def __init__(self) -> None:
        self.private_dirs: set[tuple[int, int]] = set()
        self.protected: set[tuple[int, int]] = set()
        self.born_readable: list[str] = []  # files another account could have opened

    @staticmethod
    def key(path: str | Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def restrict_to_user(self, path: Path, *, directory: bool = False) -> None:
        (self.private_dirs if directory else self.protected).add(self.key(path))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = os.open

        def opening(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
            fd = real_open(path, flags, mode, **kwargs)
            if flags & os.O_CREAT and self.key(Path(path).parent) not in self.private_dirs:
                self.born_readable.append(Path(path).name)
            return fd

        monkeypatch.setattr(privatefiles, "_WINDOWS", True)
        monkeypatch.setattr(winacl, "restrict_to_user", self.restrict_to_user)
        monkeypatch.setattr(os, "open", opening)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> SimulatedAcls:
    acls = SimulatedAcls()
    acls.install(monkeypatch)
    return acls


def test_windows_a_private_file_is_never_readable_by_others(
    windows: SimulatedAcls, tmp_path: Path
) -> None:
    path = tmp_path / "device.key"
    fd = privatefiles.create_private(path)
    with os.fdopen(fd, "wb") as f:
        f.write(b"key")
    assert windows.born_readable == []
    assert windows.key(path) in windows.protected  # its own DACL, not an inherited one
    assert path.read_bytes() == b"key"
    assert os.listdir(tmp_path) == ["device.key"]  # no staging folder left


def test_windows_keys_and_the_control_file_are_written_private(
    windows: SimulatedAcls, tmp_path: Path
) -> None:
    """The callers: a key written in place or replaced, and control.json."""
    key = pki.generate_key()
    pki.write_key(tmp_path / "device.key", key, exclusive=True)
    pki.write_key(tmp_path / "device.key", key)  # replaced through a temporary file
    control._write_endpoint(tmp_path, control.Endpoint(1234, "secret", 1))
    assert windows.born_readable == []
    for name in ("device.key", control.CONTROL_FILE):
        assert windows.key(tmp_path / name) in windows.protected
    assert sorted(os.listdir(tmp_path)) == [control.CONTROL_FILE, "device.key"]


def test_windows_an_existing_file_is_left_alone(windows: SimulatedAcls, tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        privatefiles.create_private(path)
    assert path.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["device.key"]


def test_windows_a_folder_that_cannot_be_made_private_leaves_nothing(
    windows: SimulatedAcls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, *, directory: bool = False) -> None:
        raise winacl.AclError("access denied")

    monkeypatch.setattr(winacl, "restrict_to_user", refuse)
    with pytest.raises(privatefiles.PrivateFileError, match=r"cannot make .* private"):
        privatefiles.create_private(tmp_path / "device.key")
    assert os.listdir(tmp_path) == []


def test_windows_a_file_swapped_before_it_is_opened_is_not_written(
    windows: SimulatedAcls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the move into place and the opening by name, someone with delete rights on
    the folder puts a file of theirs there: the key is not written into it."""
    path = tmp_path / "device.key"
    real_rename = os.rename

    def rename_then_swap(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        theirs = Path(f"{dst}.theirs")
        theirs.write_bytes(b"")
        os.replace(theirs, dst)  # created while ours exists: another file id

    monkeypatch.setattr(os, "rename", rename_then_swap)
    with pytest.raises(privatefiles.PrivateFileError, match="was replaced"):
        privatefiles.create_private(path)


# --- Windows ACLs: the judgement, on every platform -------------------------------------


def test_the_user_alone_is_private() -> None:
    assert winacl.other_readers(f"O:{USER}D:P(A;;FA;;;{USER})", USER) == []


def test_system_and_administrators_do_not_count() -> None:
    sddl = f"O:{USER}D:PAI(A;ID;FA;;;SY)(A;ID;FA;;;BA)(A;ID;FA;;;{USER})"
    assert winacl.other_readers(sddl, USER) == []


def test_inherited_users_and_everyone_are_readers() -> None:
    sddl = f"O:{USER}D:AI(A;ID;0x1200a9;;;BU)(A;;FR;;;WD)(A;ID;FA;;;{USER})"
    assert winacl.other_readers(sddl, USER) == ["BU", "WD"]


def test_rights_that_do_not_read_and_inherit_only_entries_do_not_count() -> None:
    sddl = f"O:{USER}D:(A;;0x100000;;;WD)(A;OICIIO;FA;;;CO)(D;;FA;;;AU)(A;;FW;;;AU)(A;;FA;;;{USER})"
    assert winacl.other_readers(sddl, USER) == []


def test_another_owner_a_null_dacl_and_a_sacl() -> None:
    other = "S-1-5-21-1-2-3-1002"
    assert winacl.other_readers(f"O:{other}D:P(A;;FA;;;{USER})", USER) == [f"owner:{other}"]
    assert winacl.other_readers(f"O:{USER}D:NO_ACCESS_CONTROL", USER) == ["*"]
    sddl = f"O:BAD:P(A;;FA;;;{USER})(A;;GA;;;{other})S:AI(AU;SAFA;FA;;;WD)"
    assert winacl.other_readers(sddl, USER) == [other]


@pytest.mark.parametrize(
    "rights",
    [
        "WD",  # WRITE_DAC: grants itself read
        "WO",  # WRITE_OWNER: takes ownership, then WRITE_DAC
        "0x40000",
        "0x80000",
        "0x2000000",  # MAXIMUM_ALLOWED: as much as the DACL allows, read included
        "KA",  # 0xf003f (KEY_ALL_ACCESS), as SDDL may spell a file's mask
        "KR",  # 0x20019 (KEY_READ): bit 0x1 is FILE_READ_DATA
        "KX",  # the same mask as KR
        "RCWD",  # codes combine
        "XY",  # a code the check does not know: counted, not trusted
        "0xZZ",  # a mask it cannot read: the same
        "1179817",  # SDDL writes masks in hex; anything else is not trusted either
    ],
)
def test_rights_that_can_take_read_access_count_as_read(rights: str) -> None:
    sddl = f"O:{USER}D:P(A;;FA;;;{USER})(A;;{rights};;;BU)"
    assert winacl.other_readers(sddl, USER) == ["BU"]


@pytest.mark.parametrize("rights", ["RC", "SD", "FW", "FX", "GW", "GX", "KW", "0x120116"])
def test_rights_that_neither_read_nor_rewrite_the_dacl_do_not_count(rights: str) -> None:
    sddl = f"O:{USER}D:P(A;;FA;;;{USER})(A;;{rights};;;BU)"
    assert winacl.other_readers(sddl, USER) == []


def test_trustees_are_described_for_people() -> None:
    assert winacl.describe("BU") == "BUILTIN\\Users"
    assert winacl.describe("S-1-1-0") == "Everyone"
    assert winacl.describe("owner:BA") == "the owner BA"
    assert winacl.describe("*") == "everyone"
    assert winacl.describe(USER) == USER


def test_owner_rights_count_as_the_owner() -> None:
    assert winacl.other_readers(f"O:{USER}D:P(A;;FA;;;OW)", USER) == []
    assert winacl.other_readers("O:BUD:P(A;;FA;;;OW)", USER) == ["owner:BU", "OW"]


@pytest.mark.skipif(not WINDOWS, reason="Windows ACLs (the hosted Windows runner)")
def test_windows_acl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"secret")
    winacl.restrict_to_user(path)
    sddl = winacl.file_sddl(path)
    assert f"(A;;FA;;;{winacl.current_user_sid()})" in sddl
    assert winacl.readers_besides_user(path) == []
