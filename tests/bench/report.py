"""Results into docs/BENCHMARKS.md: one marked section per benchmark, replaced per run.

A run rewrites only the sections of the benchmarks it ran, between
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; everything else in the file (the
introduction, other benchmarks, hand-written analysis) is kept.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import ssl
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Final

from tests.bench.procs import REPO

DOC: Final = REPO / "docs" / "BENCHMARKS.md"
_HEADER: Final = (
    "# Benchmarks\n\nWritten by `make bench` (tests/bench); see the notes in each section.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loop_name() -> str:
    try:
        return f"uvloop {metadata.version('uvloop')}"
    except metadata.PackageNotFoundError:
        return "asyncio"


def code_version() -> str:
    """The commit measured, and any uncommitted change to the product's code."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "relay", "gateway"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    if changed:
        return f"commit {head} + uncommitted changes to {', '.join(changed)}"
    return f"commit {head}"


def machine_line(extra: Sequence[str] = ()) -> str:
    """Date, machine, CPU, cores, Python, loop (and more) on one line."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        now,
        f"`{platform.machine()}`",
        cpu_model(),
        f"{os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"loop {loop_name()}",
        ssl.OPENSSL_VERSION,
        *extra,
        code_version(),
    ]
    return "Run: " + " · ".join(parts)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Section:
    """One benchmark's block of markdown."""

    name: str
    title: str
    machine: str
    table: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        head, *rows = self.table
        lines = [
            f"<!-- bench:{self.name} -->",
            f"## {self.title}",
            "",
            self.machine,
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(" --- " for _ in head) + "|",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        lines.append(f"<!-- /bench:{self.name} -->")
        return "\n".join(lines) + "\n"


def write_section(section: Section, doc: Path = DOC) -> None:
    """Replace (or append) `section` in `doc`, keeping everything else."""
    text = doc.read_text() if doc.exists() else _HEADER
    block = section.render()
    pattern = re.compile(
        rf"<!-- bench:{re.escape(section.name)} -->.*?<!-- /bench:{re.escape(section.name)} -->\n?",
        re.S,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
