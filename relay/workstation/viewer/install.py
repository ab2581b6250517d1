"""`relay viewer install`: fetch the pinned OHIF release, check its hash, unpack its dist.

Plain Python (urllib, tarfile), so the radiologist's Windows PC needs no npm. The order
makes a bad tarball harmless: download to a temporary file (size-bounded) while hashing
it, compare with the pinned SRI integrity, and only then unpack `package/dist/` into a
staging directory beside the target (regular files only; no absolute paths, `..`, links or
devices; bounded in count and bytes), write the marker last and move the staging
directory into place. Any failure removes the staging directory: there is never a
half-installed viewer, and an installed one stays as it was.

A process that is killed (or a PC that loses power) cannot remove its staging directory,
which may hold the tarball and the unpacked dist (hundreds of MB). So installs into one
target take a lock (`.NAME.install-lock` beside it): the one holding it knows that any
staging directory of that target is a dead install's, and removes it first, if it is
exactly what we make (`.NAME.partial-` and mkdtemp's 8 characters, a real directory,
holding nothing but our entries). A second install at the same time is refused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from relay.ops import replacing
from relay.ops.instancelock import InstanceLock, InstanceLocked
from relay.workstation.config import user_data_dir
from relay.workstation.viewer.pin import OHIF, ViewerRelease

__all__ = [
    "MARKER",
    "InstallLimits",
    "ViewerInstallError",
    "default_viewer_dir",
    "install_viewer",
    "installed_release",
]

MARKER = ".relay-viewer.json"  # written last: its presence means a complete install
DIST_PREFIX = "package/dist/"
LICENSE_MEMBER = "package/LICENSE"  # MIT: the notice goes with the copy
CHUNK = 1 << 16
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before the download is given up
# seconds the whole download may take: a registry (or proxy) sending a byte a minute must
# not hold `relay viewer install` for days (the release at 256 kbit/s: ~27 minutes)
DOWNLOAD_DEADLINE = 3600.0
STAGING_INFIX = ".partial-"  # .NAME.partial-XXXXXXXX: an install's staging directory
LOCK_SUFFIX = ".install-lock"  # .NAME.install-lock: held by the install into NAME
# what a staging directory may hold (_install): only such a directory is removed as dead
STAGING_ENTRIES = frozenset({"download.tgz", "dist", "old"})
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkdtemp's random name


# What Windows refuses in a file or directory name (besides the separators / and \\):
# these characters, control characters, and device names, whatever the extension or case
# ("nul.js", "Com1.txt"; COM0/LPT0 and the superscript digits too, as recent Windows
# documentation lists them).
WINDOWS_FORBIDDEN = frozenset('<>:"|?*\\')
WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"}
)


class ViewerInstallError(Exception):
    """The viewer could not be installed; the message says why and what to do."""


@dataclass(frozen=True)
class InstallLimits:
    """Bounds on what a tarball may make us write (the real one: ~50 MB, ~250 files,
    ~210 MB unpacked)."""

    tarball_bytes: int = 256 << 20
    dist_bytes: int = 1 << 30
    dist_files: int = 10_000
    # every member, also those skipped (outside dist/, directories): each is held in
    # memory by tarfile and read through, so their count and declared sizes are bounded
    members: int = 50_000
    member_bytes: int = 4 << 30


def default_viewer_dir(release: ViewerRelease = OHIF) -> Path:
    """Where the viewer goes by default: the platform's data dir, one per version."""
    return user_data_dir() / "viewer" / f"ohif-{release.version}"


def installed_release(directory: Path) -> dict[str, str] | None:
    """The marker of a complete install in `directory`, or None."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (directory / "index.html").is_file():
        return None
    return {str(k): str(v) for k, v in marker.items()}


def _is_current(directory: Path, release: ViewerRelease) -> bool:
    marker = installed_release(directory)
    return marker is not None and marker.get("integrity") == release.integrity


def _sri_digest(integrity: str) -> bytes:
    algorithm, _, encoded = integrity.partition("-")
    if algorithm != "sha512" or not encoded:
        raise ViewerInstallError(f"unsupported integrity {integrity!r}: expected sha512-...")
    return base64.b64decode(encoded)


def _copy_hashing(
    source: IO[bytes], sink: IO[bytes], limit: int, deadline: float | None = None
) -> tuple[bytes, int]:
    """Copy `source` into `sink` (at most `limit` bytes, until the monotonic `deadline`);
    its sha512 and length."""
    digest = hashlib.sha512()
    total = 0
    # read1: what has arrived, so that a registry dripping bytes meets the deadline (read
    # waits for a whole CHUNK, each byte restarting the socket's timeout)
    read = getattr(source, "read1", source.read)
    while chunk := read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise ViewerInstallError(f"the tarball is larger than {limit} bytes: refused")
        if deadline is not None and time.monotonic() > deadline:
            raise ViewerInstallError(
                f"the download took more than {DOWNLOAD_DEADLINE:.0f} s: given up (a slow "
                "link? copy the file here and use `relay viewer install --tarball FILE`)"
            )
        digest.update(chunk)
        sink.write(chunk)
    return digest.digest(), total


def _fetch(release: ViewerRelease, tarball: Path | None, sink: IO[bytes], limit: int) -> bytes:
    """Copy the tarball (a local file, or the registry's) into `sink`; its sha512."""
    if tarball is not None:
        try:
            with tarball.open("rb") as source:
                return _copy_hashing(source, sink, limit)[0]
        except OSError as exc:
            raise ViewerInstallError(f"cannot read {tarball}: {exc.strerror or exc}") from None
    request = urllib.request.Request(release.tarball, headers={"User-Agent": "dmz-relay"})
    deadline = time.monotonic() + DOWNLOAD_DEADLINE
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise ViewerInstallError(f"the tarball is larger than {limit} bytes: refused")
            digest, total = _copy_hashing(response, sink, limit, deadline)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        # HTTPException: a chunked answer cut short (IncompleteRead), a garbled status line
        reason = getattr(exc, "reason", None) or repr(exc)
        raise ViewerInstallError(
            f"cannot download {release.tarball}: {reason} (no internet? copy the file here "
            "and use `relay viewer install --tarball FILE`)"
        ) from None
    if length is not None and length.isdigit() and total != int(length):
        # urllib ends a body cut short without an error: not a tampered tarball, a lost link
        raise ViewerInstallError(
            f"the download of {release.tarball} was cut short ({total} of {length} bytes): "
            "try again"
        )
    return digest


def _windows_name_problem(part: str) -> str | None:
    """Why Windows cannot create a file or directory named `part`, or None: checked on
    every platform, since a release that installs on Linux but not on the radiologist's
    PC is found only there."""
    if any(c in WINDOWS_FORBIDDEN or ord(c) < 32 for c in part):
        return 'a character Windows forbids (<>:"|?*\\ or a control character)'
    if part[-1] in ". ":
        return "a name ending in a dot or a space"
    if part.partition(".")[0].rstrip(" ").upper() in WINDOWS_DEVICE_NAMES:
        return "a Windows device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, with any extension)"
    return None


def _member_path(name: str) -> str | None:
    """The path inside dist/ a member is unpacked to; None: not ours (skipped).
    Raises for anything that could land outside the target, or that Windows cannot create."""
    if name == LICENSE_MEMBER:
        return "LICENSE"
    if not name.startswith(DIST_PREFIX):
        return None
    relative = name[len(DIST_PREFIX) :].rstrip("/")
    if not relative:
        return None
    for part in relative.split("/"):
        if part in ("", ".", "..") or any(c in part for c in "\\:\0"):
            raise ViewerInstallError(f"unsafe path in the tarball: {name!r}: refused")
        problem = _windows_name_problem(part)
        if problem is not None:
            raise ViewerInstallError(
                f"{name!r} in the tarball is not a name Windows can create ({problem}): "
                "refused on every platform"
            )
    return relative


def _unpack(archive: Path, staging: Path, limits: InstallLimits) -> int:
    files = 0
    written = 0
    members = 0
    declared = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                members += 1
                declared += max(0, member.size)
                if members > limits.members or declared > limits.member_bytes:
                    raise ViewerInstallError(
                        f"more than {limits.members} members or {limits.member_bytes} bytes "
                        "in the tarball: refused"
                    )
                relative = _member_path(member.name)
                if relative is None or member.isdir():
                    continue
                if not member.isfile():
                    raise ViewerInstallError(
                        f"{member.name!r} is a link or device, not a file: refused"
                    )
                files += 1
                if files > limits.dist_files:
                    raise ViewerInstallError(f"more than {limits.dist_files} files: refused")
                target = staging.joinpath(*relative.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members have data
                    raise ViewerInstallError(f"{member.name!r} has no data: refused")
                with source, target.open("xb") as sink:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > limits.dist_bytes:
                            raise ViewerInstallError(
                                f"unpacks to more than {limits.dist_bytes} bytes: refused"
                            )
                        sink.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise ViewerInstallError(f"the tarball names {exc.filename} twice: refused") from None
        raise ViewerInstallError(f"the tarball cannot be unpacked: {exc}") from None
    if not (staging / "index.html").is_file():
        raise ViewerInstallError("the tarball has no package/dist/index.html: not a built viewer")
    return files


def install_viewer(
    directory: Path | None = None,
    *,
    release: ViewerRelease = OHIF,
    tarball: Path | None = None,
    force: bool = False,
    limits: InstallLimits = InstallLimits(),
) -> tuple[Path, bool]:
    """Install `release` into `directory` (default: default_viewer_dir()).

    Returns (directory, whether anything was installed): an install with the same
    integrity is kept unless `force`. `tarball`: a local copy instead of the registry.
    """
    target = Path(directory) if directory is not None else default_viewer_dir(release)
    if not force and _is_current(target, release):
        return target, False
    _check_replaceable(target)
    expected = _sri_digest(release.integrity)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ViewerInstallError(f"cannot write to {target.parent}: {exc.strerror}") from None
    with _installing(target) as alone:
        if alone:
            _remove_dead_staging(target)
        return _install(target, release, tarball, limits, expected), True


def _install(
    target: Path,
    release: ViewerRelease,
    tarball: Path | None,
    limits: InstallLimits,
    expected: bytes,
) -> Path:
    """Fetch, check, unpack and swap in, through a staging directory removed whatever
    happens (install_viewer's steps once the target may be written)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    except OSError as exc:
        raise ViewerInstallError(f"cannot write to {target.parent}: {exc.strerror}") from None
    try:
        archive = staging / "download.tgz"
        with archive.open("wb") as sink:
            digest = _fetch(release, tarball, sink, limits.tarball_bytes)
        if digest != expected:
            actual = base64.b64encode(digest).decode()
            raise ViewerInstallError(
                f"the tarball's hash sha512-{actual} is not the pinned {release.integrity} "
                f"of {release.name} {release.version}: refused (tampered or wrong file)"
            )
        dist = staging / "dist"
        dist.mkdir()
        _unpack(archive, dist, limits)
        archive.unlink()
        marker = {"name": release.name, "version": release.version}
        marker["integrity"] = release.integrity
        (dist / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        _swap_in(dist, target, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _staging_prefix(target: Path) -> str:
    return f".{target.name}{STAGING_INFIX}"


@contextlib.contextmanager
def _installing(target: Path) -> Iterator[bool]:
    """Hold the install lock of `target` meanwhile; yields whether it is held (False: this
    file system has no locks, so a staging directory may be a live install's). Another
    install holding it: ViewerInstallError."""
    lock = InstanceLock(target.parent / f".{target.name}{LOCK_SUFFIX}")
    try:
        lock.acquire()
    except InstanceLocked:
        raise ViewerInstallError(
            f"another `relay viewer install` into {target} is running: wait for it to end"
        ) from None
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _remove_dead_staging(target: Path) -> None:
    """Remove what installs into `target` that were killed left behind (the lock is held,
    so none of them is running): only directories named as ours and holding only our
    entries; anything else beside the target is left as it is."""
    prefix = _staging_prefix(target)
    try:
        names = [e.name for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = target.parent / name
        if _RANDOM_PART.fullmatch(name[len(prefix) :]) and _is_our_staging(path):
            shutil.rmtree(path, ignore_errors=True)


def _is_our_staging(path: Path) -> bool:
    """A real directory (not a link or a Windows junction to somewhere else) holding
    nothing but what _install writes into its staging directory."""
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or _is_reparse_point(info):
            return False
        with os.scandir(path) as entries:
            return {e.name for e in entries} <= STAGING_ENTRIES
    except OSError:
        return False


def _is_reparse_point(info: os.stat_result) -> bool:
    """A Windows junction or symbolic link (lstat calls a junction a directory)."""
    attributes = getattr(info, "st_file_attributes", 0)
    return bool(attributes & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400))


def _check_replaceable(target: Path) -> None:
    """Refuse a target the install would wipe out that is not ours: the swap replaces the
    whole directory, and `--dir ~/Documents` must not delete the radiologist's files."""
    try:
        if not target.exists() or (target / MARKER).is_file():
            return
        if not target.is_dir():
            raise ViewerInstallError(f"{target} is a file, not a directory: refused")
        if any(target.iterdir()):
            raise ViewerInstallError(
                f"{target} is not empty and holds no viewer: refused (name a new or empty "
                "directory; nothing in it was changed)"
            )
    except OSError as exc:
        raise ViewerInstallError(f"cannot read {target}: {exc.strerror or exc}") from None


def _swap_in(dist: Path, target: Path, staging: Path) -> None:
    """Move the complete `dist` to `target`; an older install there is replaced."""
    old = staging / "old"
    try:
        if target.exists():  # Windows: a scanner may be reading a fresh file a moment
            replacing.replace(target, old)
        replacing.replace(dist, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            if old.exists() and not target.exists():
                os.replace(old, target)  # put the old install back
        raise ViewerInstallError(f"cannot move the viewer to {target}: {exc.strerror}") from None
