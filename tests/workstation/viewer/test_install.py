"""`relay viewer install`: the hash decides, the unpacking cannot escape, nothing half-done."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.cli import main
from relay.ops.instancelock import InstanceLock
from relay.workstation.viewer import install
from relay.workstation.viewer.install import (
    MARKER,
    InstallLimits,
    ViewerInstallError,
    default_viewer_dir,
    install_viewer,
    installed_release,
)
from relay.workstation.viewer.pin import OHIF
from tests.ops.test_replacing import flaky_replace
from tests.workstation.viewer.tarballs import INDEX, make_tarball, member, release_for


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_installs_only_the_dist_and_the_licence(tmp_path: Path) -> None:
    tgz = make_tarball(tmp_path / "a.tgz", [("package/dist/js/app.js", b"x" * 100_000)])
    target = tmp_path / "viewer"
    where, fresh = install_viewer(target, release=release_for(tgz), tarball=tgz)
    assert (where, fresh) == (target, True)
    assert (target / "index.html").read_bytes() == INDEX
    assert (target / "js" / "app.js").read_bytes() == b"x" * 100_000
    assert (target / "LICENSE").read_bytes() == b"MIT"
    assert not (target / "package.json").exists()
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "LICENSE", "index.html", "js"]
    assert installed_release(target) == {
        "name": "@ohif/app",
        "version": "0.0.0-test",
        "integrity": release_for(tgz).integrity,
    }
    assert leftovers(tmp_path) == []
    # the same release again: kept as it is; --force: installed again
    assert install_viewer(target, release=release_for(tgz), tarball=tgz) == (target, False)
    assert install_viewer(target, release=release_for(tgz), tarball=tgz, force=True)[1]


def test_a_tampered_tarball_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    good = make_tarball(tmp_path / "good.tgz")
    release = release_for(good)
    bad = make_tarball(tmp_path / "bad.tgz", [("package/dist/evil.js", b"alert(1)")])
    target = tmp_path / "viewer"
    with pytest.raises(ViewerInstallError, match=r"is not the pinned sha512-.*tampered"):
        install_viewer(target, release=release, tarball=bad)
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_a_failed_upgrade_keeps_the_installed_viewer(tmp_path: Path) -> None:
    old = make_tarball(tmp_path / "old.tgz")
    target = tmp_path / "viewer"
    install_viewer(target, release=release_for(old), tarball=old)
    new = make_tarball(tmp_path / "new.tgz", [("package/dist/a.js", b"1")])
    pin = release_for(old).integrity
    wrong_pin = dataclasses.replace(release_for(new), version="2", integrity=pin)
    with pytest.raises(ViewerInstallError, match="tampered"):
        install_viewer(target, release=wrong_pin, tarball=new, force=True)
    assert installed_release(target) is not None
    assert not (target / "a.js").exists()
    assert leftovers(tmp_path) == []


def test_an_upgrade_rides_out_a_scanner_holding_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: an antivirus still reading the old install refuses the first renames."""
    old = make_tarball(tmp_path / "old.tgz")
    target = tmp_path / "viewer"
    install_viewer(target, release=release_for(old), tarball=old)
    new = make_tarball(tmp_path / "new.tgz", [("package/dist/a.js", b"1")])
    monkeypatch.setattr(sys, "platform", "win32")
    calls = flaky_replace(monkeypatch, failures=2)
    release = dataclasses.replace(release_for(new), version="2")
    install_viewer(target, release=release, tarball=new, force=True)
    assert (target / "a.js").read_bytes() == b"1" and len(calls) == 4
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("package/dist/../../escape.js", tarfile.REGTYPE, "unsafe path"),
        ("package/dist/a/../../x", tarfile.REGTYPE, "unsafe path"),
        ("package/dist/C:evil", tarfile.REGTYPE, "unsafe path"),
        ("package/dist/a\\..\\..\\x", tarfile.REGTYPE, "unsafe path"),
        ("package/dist/link.js", tarfile.SYMTYPE, "link or device"),
        ("package/dist/hard.js", tarfile.LNKTYPE, "link or device"),
        ("package/dist/fifo", tarfile.FIFOTYPE, "link or device"),
    ],
)
def test_members_that_could_escape_are_refused(
    tmp_path: Path, name: str, kind: bytes, why: str
) -> None:
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        member(tar, "package/dist/index.html", INDEX)
        member(tar, name, b"x" if kind == tarfile.REGTYPE else b"", kind, link="/etc/passwd")
    target = tmp_path / "sub" / "viewer"
    with pytest.raises(ViewerInstallError, match=why):
        install_viewer(target, release=release_for(tgz), tarball=tgz)
    assert not target.exists()
    assert not (tmp_path / "escape.js").exists() and not (tmp_path / "sub" / "x").exists()
    assert leftovers(tmp_path / "sub") == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        *((f"package/dist/{device}", "device name") for device in ("CON", "aux", "Nul")),
        ("package/dist/nul.tar.gz", "device name"),
        ("package/dist/Com1.js", "device name"),
        ("package/dist/LPT9.txt", "device name"),
        ("package/dist/com\u00b2.js", "device name"),
        ("package/dist/CON .js", "device name"),
        ("package/dist/assets/prn/logo.svg", "device name"),  # a directory too
        ("package/dist/app.js.", "ending in a dot or a space"),
        ("package/dist/fonts /a.woff", "ending in a dot or a space"),
        *((f"package/dist/a{c}b.js", "a character Windows forbids") for c in '<>"|?*'),
        ("package/dist/a\x01b.js", "a character Windows forbids"),
        ("package/dist/tab\there.js", "a character Windows forbids"),
    ],
)
def test_members_windows_cannot_create_are_refused_everywhere(
    tmp_path: Path, name: str, why: str
) -> None:
    """A release that installs on Linux but not on the radiologist's PC is a support call."""
    tgz = make_tarball(tmp_path / "a.tgz", [(name, b"x")])
    target = tmp_path / "viewer"
    with pytest.raises(ViewerInstallError) as info:
        install_viewer(target, release=release_for(tgz), tarball=tgz)
    assert str(info.value).startswith(f"{name!r} in the tarball is not a name Windows can create")
    assert why in str(info.value) and str(info.value).endswith(": refused on every platform")
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_names_that_only_look_like_windows_devices_install(tmp_path: Path) -> None:
    names = ["console.js", "CONFIG.json", "com10.js", "lpt.css", "aux-panel/nul_icon.svg"]
    tgz = make_tarball(tmp_path / "a.tgz", [(f"package/dist/{n}", b"x") for n in names])
    target = tmp_path / "viewer"
    install_viewer(target, release=release_for(tgz), tarball=tgz)
    assert all((target / n).read_bytes() == b"x" for n in names)


def test_limits_on_size_and_count_are_enforced(tmp_path: Path) -> None:
    tgz = make_tarball(
        tmp_path / "big.tgz", [(f"package/dist/{i}.js", b"0" * 4000) for i in range(5)]
    )
    release = release_for(tgz)
    target = tmp_path / "viewer"
    cases = [
        (InstallLimits(tarball_bytes=100), "larger than 100 bytes"),
        (InstallLimits(dist_bytes=10_000), "more than 10000 bytes"),
        (InstallLimits(dist_files=3), "more than 3 files"),
    ]
    for limits, message in cases:
        with pytest.raises(ViewerInstallError, match=message):
            install_viewer(target, release=release, tarball=tgz, limits=limits)
        assert not target.exists()
        assert leftovers(tmp_path) == []
    enough = InstallLimits(dist_files=7)  # 6 in dist/ and the LICENSE
    install_viewer(target, release=release, tarball=tgz, limits=enough)


def test_a_tarball_without_a_built_dist_is_refused(tmp_path: Path) -> None:
    tgz = make_tarball(tmp_path / "src.tgz", [("package/src/index.js", b"")], index=False)
    with pytest.raises(ViewerInstallError, match=r"no package/dist/index\.html"):
        install_viewer(tmp_path / "v", release=release_for(tgz), tarball=tgz)
    assert not (tmp_path / "v").exists()


def test_garbage_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tarball" * 100)
    with pytest.raises(ViewerInstallError, match="cannot be unpacked"):
        install_viewer(tmp_path / "v", release=release_for(junk), tarball=junk)
    assert not (tmp_path / "v").exists()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving the files in tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()


def test_downloads_over_http_and_checks_what_arrived(
    tmp_path: Path, registry: tuple[str, Path]
) -> None:
    base, www = registry
    wasm = b"\0asm" + os.urandom(5000)  # incompressible: the tarball is > 5000 bytes
    tgz = make_tarball(www / "app.tgz", [("package/dist/a.wasm", wasm)])
    release = release_for(tgz, f"{base}/app.tgz")
    target = tmp_path / "viewer"
    assert install_viewer(target, release=release) == (target, True)
    assert (target / "a.wasm").read_bytes() == wasm
    with pytest.raises(ViewerInstallError, match="larger than 1000 bytes"):  # Content-Length
        install_viewer(tmp_path / "v2", release=release, limits=InstallLimits(tarball_bytes=1000))
    missing = release_for(tgz, f"{base}/gone.tgz")
    with pytest.raises(ViewerInstallError, match=r"cannot download .*gone\.tgz.*--tarball"):
        install_viewer(tmp_path / "v3", release=missing)
    assert not (tmp_path / "v2").exists() and not (tmp_path / "v3").exists()


def test_cli_refuses_a_tarball_that_is_not_the_pinned_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tgz = make_tarball(tmp_path / "other.tgz")
    target = tmp_path / "viewer"
    code = main(["viewer", "install", "--dir", str(target), "--tarball", str(tgz)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"is not the pinned {OHIF.integrity} of @ohif/app {OHIF.version}" in err
    assert not target.exists()


def test_default_directory_is_per_version_in_the_users_data_dir() -> None:
    assert default_viewer_dir().name == f"ohif-{OHIF.version}"
    assert default_viewer_dir().parent.name == "viewer"


def test_every_member_counts_toward_the_limits(tmp_path: Path) -> None:
    """Members outside dist/ are skipped but still read and held by tarfile: counted."""
    tgz = make_tarball(
        tmp_path / "many.tgz", [(f"package/src/{i}.js", b"0" * 500) for i in range(20)]
    )
    release = release_for(tgz)
    for limits, message in [
        (InstallLimits(members=10), "more than 10 members"),
        (InstallLimits(member_bytes=5000), "or 5000 bytes in the tarball"),
    ]:
        with pytest.raises(ViewerInstallError, match=message):
            install_viewer(tmp_path / "v", release=release, tarball=tgz, limits=limits)
        assert not (tmp_path / "v").exists() and leftovers(tmp_path) == []


@contextlib.contextmanager
def raw_registry(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A registry on loopback that reads one request and lets `answer` write raw bytes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/app.tgz"
    finally:
        listener.close()
        thread.join(5)


def cut_at_length(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)


def cut_in_a_chunk(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 100)


@pytest.mark.parametrize(
    ("answer", "why"),
    [(cut_at_length, r"cut short \(1000 of 100000 bytes\)"), (cut_in_a_chunk, "IncompleteRead")],
)
def test_a_download_cut_short_is_one_clear_line(
    tmp_path: Path, answer: Callable[[socket.socket], None], why: str
) -> None:
    """Not a traceback (a chunked answer cut short), not 'tampered' (a short body)."""
    with raw_registry(answer) as url:
        release = dataclasses.replace(OHIF, tarball=url)
        with pytest.raises(ViewerInstallError, match=why) as caught:
            install_viewer(tmp_path / "v", release=release)
    assert "\n" not in str(caught.value) and "tampered" not in str(caught.value)
    assert not (tmp_path / "v").exists() and leftovers(tmp_path) == []


def test_a_dripping_download_is_given_up_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install, "DOWNLOAD_DEADLINE", 0.3, raising=False)

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n")
        for _ in range(40):  # 2 s in all
            conn.sendall(b"x" * 100)
            time.sleep(0.05)

    with raw_registry(drip) as url:
        started = time.monotonic()
        with pytest.raises(ViewerInstallError, match="took more than"):
            install_viewer(tmp_path / "v", release=dataclasses.replace(OHIF, tarball=url))
        assert time.monotonic() - started < 1.5
    assert not (tmp_path / "v").exists() and leftovers(tmp_path) == []


def test_a_directory_that_is_not_a_viewer_is_never_replaced(tmp_path: Path) -> None:
    """`--dir` naming a folder of the user's: refused, not swapped out and deleted."""
    tgz = make_tarball(tmp_path / "app.tgz")
    release = release_for(tgz)
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "report.docx").write_bytes(b"precious")
    with pytest.raises(ViewerInstallError, match="not empty and holds no viewer"):
        install_viewer(documents, release=release, tarball=tgz, force=True)
    assert (documents / "report.docx").read_bytes() == b"precious"
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # made beforehand by the user: fine
    assert install_viewer(empty, release=release, tarball=tgz) == (empty, True)
    assert install_viewer(empty, release=release, tarball=tgz, force=True) == (empty, True)


def _staging_left_by_a_killed_install(parent: Path, name: str) -> Path:
    """What an install killed while unpacking leaves: its tarball and part of the dist."""
    staging = parent / name
    (staging / "dist" / "js").mkdir(parents=True)
    (staging / "download.tgz").write_bytes(b"\x1f\x8b" + b"x" * 1000)
    (staging / "dist" / "js" / "app.js").write_bytes(b"half")
    return staging


def test_an_interrupted_install_s_leftovers_go_at_the_next_install(tmp_path: Path) -> None:
    """Only what our installs into this target make goes: every look-alike stays."""
    tgz = make_tarball(tmp_path / "app.tgz")
    parent = tmp_path / "viewers"
    parent.mkdir()
    dead = [_staging_left_by_a_killed_install(parent, n)
            for n in (".viewer.partial-ab12_xyz", ".viewer.partial-00000000")]  # fmt: skip
    kept = [
        _staging_left_by_a_killed_install(parent, ".viewer.partial-abc"),  # not mkdtemp's
        _staging_left_by_a_killed_install(parent, ".other.partial-ab12_xyz"),  # another target
        _staging_left_by_a_killed_install(parent, ".viewer.partial-ABCD1234"),  # not mkdtemp's
    ]
    foreign = _staging_left_by_a_killed_install(parent, ".viewer.partial-users000")
    (foreign / "notes.txt").write_text("not ours")  # holds what we never write
    (parent / ".viewer.partial-file0000").write_bytes(b"a file")
    outside = tmp_path / "elsewhere"
    (outside / "dist").mkdir(parents=True)
    with contextlib.suppress(OSError):  # Windows without the right to make links
        os.symlink(outside, parent / ".viewer.partial-link0000", target_is_directory=True)
    assert install_viewer(parent / "viewer", release=release_for(tgz), tarball=tgz)[1]
    assert not any(d.exists() for d in dead)
    assert all((k / "dist" / "js" / "app.js").read_bytes() == b"half" for k in kept)
    assert (foreign / "notes.txt").exists() and (parent / ".viewer.partial-file0000").exists()
    assert (outside / "dist").is_dir()
    assert (parent / "viewer" / "index.html").read_bytes() == INDEX


def test_a_second_install_at_the_same_time_is_refused_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    tgz = make_tarball(tmp_path / "app.tgz")
    running = _staging_left_by_a_killed_install(tmp_path, ".viewer.partial-running0")
    with InstanceLock(tmp_path / f".viewer{install.LOCK_SUFFIX}"):  # the first install's
        with pytest.raises(ViewerInstallError, match="another `relay viewer install`"):
            install_viewer(tmp_path / "viewer", release=release_for(tgz), tarball=tgz)
        assert (running / "download.tgz").exists()
    assert install_viewer(tmp_path / "viewer", release=release_for(tgz), tarball=tgz)[1]
    assert not running.exists()  # the lock was free: that install is dead
