"""npm-like tarballs made on the fly, and the pin (SRI integrity) that matches them."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from relay.workstation.viewer.pin import ViewerRelease

INDEX = b"<!doctype html><title>viewer</title><script src=/app-config.js></script>"


def member(
    tar: tarfile.TarFile,
    name: str,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tarball(
    path: Path, files: Iterable[tuple[str, bytes]] = (), *, index: bool = True
) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        member(tar, "package/package.json", b'{"name": "@ohif/app"}')
        member(tar, "package/LICENSE", b"MIT")
        if index:
            member(tar, "package/dist/index.html", INDEX)
        for name, data in files:
            member(tar, name, data)
    return path


def integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def release_for(path: Path, url: str = "http://127.0.0.1:9/none.tgz") -> ViewerRelease:
    return ViewerRelease(
        name="@ohif/app", version="0.0.0-test", tarball=url, integrity=integrity(path)
    )
