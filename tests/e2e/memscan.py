"""Searching a live process's memory for byte strings (the gateway canary tests).

Reads every readable private mapping of /proc/PID/maps through /proc/PID/mem (as a
debugger would; needs the same user and ptrace permission). Shared file mappings (the
Python binary, libraries) are skipped: they hold code, not what the process received.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def _regions(pid: int) -> list[tuple[int, int, str]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start_s, end_s = fields[0].split("-")
        perms = fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if not perms.startswith("r") or name in ("[vvar]", "[vsyscall]", "[vdso]"):
            continue
        if perms[3] == "s":  # shared mappings: files and devices, not the heap
            continue
        if name.startswith("/") and "w" not in perms:  # read-only file text
            continue
        out.append((int(start_s, 16), int(end_s, 16), name))
    return out


def scan(pid: int, needles: Iterable[bytes]) -> dict[bytes, int]:
    """How often each needle occurs in the process's readable private memory."""
    wanted = list(needles)
    found = dict.fromkeys(wanted, 0)
    overlap = max(len(n) for n in wanted) - 1
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    scanned = 0
    try:
        for start, end, _ in _regions(pid):
            tail = b""
            pos = start
            while pos < end:
                try:
                    chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                except OSError:
                    break  # unmapped meanwhile, or a guard page
                if not chunk:
                    break
                scanned += len(chunk)
                window = tail + chunk
                for needle in wanted:
                    found[needle] += window.count(needle)
                tail = window[-overlap:] if overlap else b""
                pos += len(chunk)
    finally:
        os.close(fd)
    assert scanned > 1 << 20, "the scan read almost nothing: no permission?"
    return found
