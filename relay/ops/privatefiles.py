"""Files that only this user may read (the device key, the control endpoint's secret),
protected and checked by each platform's own means.

POSIX: mode 0600 (0700 for a directory); a file that group or others may read, write
or run is refused. Windows: mode bits protect nothing, so the file gets a protected DACL
with one entry, the current user (relay.ops.winacl), from its creation on (it is born in
a private staging folder); a file that another account than the user, SYSTEM or
Administrators may read, or give itself read, is refused. This is the only module of the
project that touches POSIX modes (the portable lane of the tests enforces it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from pathlib import Path

from relay.ops import winacl

__all__ = [
    "PrivateFileError",
    "check_private",
    "create_private",
    "fix_command",
    "fix_shell",
    "protect",
]

_WINDOWS = sys.platform == "win32"


class PrivateFileError(Exception):
    """A private file that others may read, or cannot be made private; one line for the
    user that names the file and what to run."""


def fix_command(path: Path) -> str:
    """What the user runs to make `path` private again, on this platform (on Windows, in
    PowerShell: `fix_shell`).

    Windows: the whole access list is replaced by a new one, protected from inheritance,
    with one entry for the user (by name), as `protect` does. icacls cannot say that in
    one command: `/inheritance:r /grant:r` keeps other accounts' explicit entries, so the
    check would still refuse; `/reset` first would let the folder's readers in between.
    """
    if _WINDOWS:
        account = "[Security.Principal.WindowsIdentity]::GetCurrent().User"  # who runs it
        if os.environ.get("USERNAME"):  # better: the user this check ran as, by name
            user = os.environ["USERNAME"]
            if os.environ.get("USERDOMAIN"):
                user = f"{os.environ['USERDOMAIN']}\\{user}"
            account = _ps_quote(user)
        return (
            "$a = New-Object Security.AccessControl.FileSecurity; "
            "$a.SetAccessRuleProtection($true, $false); "
            "$a.AddAccessRule((New-Object Security.AccessControl.FileSystemAccessRule("
            f"{account}, 'FullControl', 'Allow'))); "
            f"Set-Acl -LiteralPath {_ps_quote(str(path))} -AclObject $a"
        )
    return f"chmod 600 '{path}'"


def _ps_quote(text: str) -> str:
    """A PowerShell single-quoted string: nothing in it is expanded."""
    return "'" + text.replace("'", "''") + "'"


def fix_shell() -> str:
    """Where `fix_command` runs: PowerShell on Windows, any POSIX shell elsewhere."""
    return "PowerShell" if _WINDOWS else "a shell"


def protect(path: Path, *, directory: bool = False) -> None:
    """Make `path` readable and writable by this user only."""
    try:
        if _WINDOWS:
            winacl.restrict_to_user(Path(path), directory=directory)
        else:
            os.chmod(path, 0o700 if directory else 0o600)
    except OSError as exc:
        raise PrivateFileError(f"cannot make {path} private: {exc.strerror or exc}") from None


def create_private(path: Path) -> int:
    """Create `path` (it must not exist), private before anything is written to it, and
    return a file descriptor open for writing."""
    if _WINDOWS:  # os.open's mode only sets the read-only flag there
        return _create_private_windows(Path(path))
    return os.open(path, _CREATE, 0o600)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_private_windows(path: Path) -> int:
    """Windows checks access when a handle is opened, and a new file gets the DACL its
    folder passes on (e.g. "Users: read" under C:\\ProgramData): restricted only after
    os.open, it could be opened by another account in between and read through that handle
    once written. So the file is born in a staging folder made private while still empty,
    given its own protected DACL there, moved into place (a move within the volume keeps
    the DACL) and opened again by name: a file open through os.open (no FILE_SHARE_DELETE)
    cannot be moved."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}.private")
    staged = staging / path.name
    os.mkdir(staging)
    try:
        protect(staging, directory=True)  # before anything is created in it
        os.close(os.open(staged, _CREATE, 0o600))  # inherits the user-only DACL
        protect(staged)  # its own, which no later inheritance from `path`'s folder rewrites
        born = os.stat(staged)
        os.rename(staged, path)  # refuses an existing `path` on Windows
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(staging)
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (born.st_dev, born.st_ino):  # someone swapped it
        os.close(fd)
        raise PrivateFileError(f"{path} was replaced while it was being created; not using it")
    return fd


def check_private(path: Path, what: str = "private key") -> None:
    """Raise PrivateFileError unless only this user (and the system) may read `path`."""
    path = Path(path)
    try:
        if _WINDOWS:
            others = winacl.readers_besides_user(path)
            names = ", ".join(winacl.describe(o) for o in others)
            detail = f"readable by {names}" if others else ""
        else:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            detail = f"mode {mode:04o}, open to group or others" if mode & 0o077 else ""
    except OSError as exc:
        raise PrivateFileError(f"cannot check {path}: {exc.strerror or exc}") from None
    if detail:
        raise PrivateFileError(
            f"the {what} {path} is not private ({detail}); "
            f"to fix it run in {fix_shell()}: {fix_command(path)}"
        )
