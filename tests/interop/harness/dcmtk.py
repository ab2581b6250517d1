"""DCMTK command-line tools as typed Python calls.

Each client runs inside the namespace of the node it talks to (``DicomNode.ns``), with
TCP_NODELAY=1 and a timeout, and returns a result carrying its exit code and output.
With ``check=True`` (the default) a non-zero exit raises ``ToolError`` showing the
command and its output, so a test cannot ignore a failed tool by accident.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self, TypeVar

from .netns import NetNS
from .tools import HarnessError, require_tools, tail, tool_env, wait_listening

if TYPE_CHECKING:
    from pydicom import Dataset

DEFAULT_TIMEOUT = 60.0  # seconds for one tool run
LOCALHOST = "127.0.0.1"
STORESCU_BATCH = 500  # files per storescu run: keeps argv far below ARG_MAX

_R = TypeVar("_R", bound="ToolResult")

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Model = Literal["patient", "study"]

_MODEL_FLAG: dict[str, str] = {"patient": "-P", "study": "-S"}
_UNIQUE_KEY: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


_STATUS_RE = re.compile(
    r"Received (?:Final )?(?:Echo|Find|Move|Store|C-GET) Response(?: \d+)? \(([^)]*)\)"
)
_SUBOPS_RE = re.compile(r"Number of (\w+) Suboperations\s*:\s*(\d+)")
_GOOD_STATUS = ("Success", "Pending", "Warning")


class ToolError(HarnessError):
    """A DCMTK tool exited non-zero or timed out."""


@dataclass(frozen=True)
class DicomNode:
    """Where a DICOM SCP answers: ``host:port`` as seen from inside ``ns``.

    ``ns=None`` means the test process's own network namespace (host loopback).
    """

    host: str
    port: int
    ae_title: str = "ANY-SCP"
    ns: NetNS | None = None


@dataclass(frozen=True)
class ToolResult:
    """Exit code and output of one tool run."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout then stderr (which one DCMTK logs to differs between tools)."""
        return self.stdout + self.stderr

    @property
    def statuses(self) -> list[str]:
        """DIMSE statuses of the responses the tool logged, in order.

        E.g. ``["Pending", "Success"]`` or ``["Failed: UnableToProcess"]``. Tools are
        run with ``-v``, which logs one line per response.
        """
        return _STATUS_RE.findall(self.output)

    @property
    def status(self) -> str | None:
        """The last non-pending DIMSE status, or None if the tool logged none."""
        final = [status for status in self.statuses if not status.startswith("Pending")]
        return final[-1] if final else None

    @property
    def suboperations(self) -> dict[str, int]:
        """getscu's final sub-operation counts: Remaining, Completed, Failed, Warning."""
        return {name: int(count) for name, count in _SUBOPS_RE.findall(self.output)}

    @property
    def ok(self) -> bool:
        """Exit code 0 and no failed response (getscu exits 0 on a failed C-GET)."""
        return self.returncode == 0 and not any(
            not status.startswith(_GOOD_STATUS) for status in self.statuses
        )

    def check(self) -> Self:
        """Raise ``ToolError`` with the command and its output unless ``ok``."""
        if not self.ok:
            raise ToolError(
                f"{' '.join(self.argv)} exited {self.returncode}"
                f" (status {self.status}):\n{self.output.strip()}"
            )
        return self


@dataclass(frozen=True)
class FindResult(ToolResult):
    """A findscu run and the C-FIND matches it received, in order."""

    matches: tuple[Dataset, ...] = field(default=())

    def values(self, keyword: str) -> list[str]:
        """One attribute of every match, as strings (missing: empty string)."""
        return [str(match.get(keyword, "")) for match in self.matches]


@dataclass(frozen=True)
class RetrieveResult(ToolResult):
    """A getscu run and the files it received, sorted by path."""

    files: tuple[Path, ...] = field(default=())


def run_tool(
    argv: Sequence[str],
    *,
    ns: NetNS | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> ToolResult:
    """Run one tool to completion (inside ``ns`` if given) with TCP_NODELAY=1.

    Skips (fails in CI) if the tool is not installed; raises ``ToolError`` on timeout.
    """
    require_tools(argv[0])
    full = ns.exec_argv(argv) if ns is not None else list(argv)
    try:
        proc = subprocess.run(
            full, env=tool_env(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = _text(exc.stdout) + _text(exc.stderr)
        raise ToolError(f"{' '.join(full)} timed out after {timeout} s:\n{out.strip()}") from exc
    return ToolResult(tuple(full), proc.returncode, proc.stdout, proc.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _peer_args(node: DicomNode, calling_ae: str) -> list[str]:
    return ["-aet", calling_ae, "-aec", node.ae_title, node.host, str(node.port)]


def _key_args(level: Level, keys: Mapping[str, str]) -> list[str]:
    """``-k`` options: the level, the level's unique key (as a return key), then ``keys``."""
    merged = {"QueryRetrieveLevel": level, _UNIQUE_KEY[level]: ""}
    merged.update(keys)
    args: list[str] = []
    for key, value in merged.items():
        args += ["-k", f"{key}={value}"]
    return args


def _finish(result: _R, check: bool) -> _R:
    return result.check() if check else result


def echoscu(
    node: DicomNode,
    *,
    calling_ae: str = "ECHOSCU",
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> ToolResult:
    """C-ECHO ``node``."""
    argv = ["echoscu", "-v", *extra_args, *_peer_args(node, calling_ae)]
    return _finish(run_tool(argv, ns=node.ns, timeout=timeout), check)


def findscu(
    node: DicomNode,
    level: Level,
    keys: Mapping[str, str] | None = None,
    *,
    model: Model = "study",
    calling_ae: str = "FINDSCU",
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> FindResult:
    """C-FIND at ``level``; ``keys`` are matching/return keys (``""`` asks for a value).

    The level's unique key is always requested. Matches come from ``findscu --extract``
    (one rsp*.dcm per response, read back with pydicom), not from parsing log text.
    """
    from pydicom import dcmread

    with tempfile.TemporaryDirectory(prefix="dmzr-findscu-") as out:
        argv = [
            "findscu", "-v", _MODEL_FLAG[model], "--extract", "-od", out, *extra_args,
            *_key_args(level, keys or {}), *_peer_args(node, calling_ae),
        ]  # fmt: skip
        base = run_tool(argv, ns=node.ns, timeout=timeout)
        matches = tuple(dcmread(path) for path in sorted(Path(out).glob("rsp*.dcm")))
    return _finish(FindResult(base.argv, base.returncode, base.stdout, base.stderr, matches), check)


def getscu(
    node: DicomNode,
    out_dir: Path,
    level: Level,
    keys: Mapping[str, str] | None = None,
    *,
    model: Model = "study",
    calling_ae: str = "GETSCU",
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> RetrieveResult:
    """C-GET at ``level`` into ``out_dir`` (created); ``files`` are the ones it added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    argv = [
        "getscu", "-v", _MODEL_FLAG[model], "-od", str(out_dir), *extra_args,
        *_key_args(level, keys or {}), *_peer_args(node, calling_ae),
    ]  # fmt: skip
    base = run_tool(argv, ns=node.ns, timeout=timeout)
    files = tuple(sorted(path for path in out_dir.iterdir() if path not in before))
    return _finish(
        RetrieveResult(base.argv, base.returncode, base.stdout, base.stderr, files), check
    )


def movescu(
    node: DicomNode,
    destination_ae: str,
    level: Level,
    keys: Mapping[str, str] | None = None,
    *,
    model: Model = "study",
    calling_ae: str = "MOVESCU",
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> ToolResult:
    """C-MOVE at ``level`` to ``destination_ae`` (which ``node`` must know, e.g. a storescp)."""
    argv = [
        "movescu", "-v", _MODEL_FLAG[model], "-aem", destination_ae, *extra_args,
        *_key_args(level, keys or {}), *_peer_args(node, calling_ae),
    ]  # fmt: skip
    return _finish(run_tool(argv, ns=node.ns, timeout=timeout), check)


def storescu(
    node: DicomNode,
    paths: Iterable[Path],
    *,
    calling_ae: str = "STORESCU",
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
    check: bool = True,
) -> ToolResult:
    """C-STORE files (directories are scanned recursively) to ``node``.

    Large sets go in batches of ``STORESCU_BATCH`` files, one association each; the
    result is the first failing batch, or the last one. ``timeout`` is per batch.
    """
    items = [str(path) for path in paths]
    if not items:
        raise ValueError("storescu: no files to send")
    result: ToolResult | None = None
    for start in range(0, len(items), STORESCU_BATCH):
        argv = [
            "storescu", "-v", "+sd", "+r", "-nh", *extra_args,
            *_peer_args(node, calling_ae), *items[start : start + STORESCU_BATCH],
        ]  # fmt: skip
        result = run_tool(argv, ns=node.ns, timeout=timeout)
        if not result.ok:
            break
    assert result is not None
    return _finish(result, check)


class StoreSCP:
    """A running ``storescp`` (see ``storescp()``): a C-STORE / C-MOVE destination."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        node: DicomNode,
        out_dir: Path,
        log: Path,
        received_list: Path,
    ) -> None:
        self.proc = proc
        self.node = node
        self.out_dir = out_dir
        self.log_path = log
        self.received_list = received_list

    @property
    def ae_title(self) -> str:
        return self.node.ae_title

    @property
    def port(self) -> int:
        return self.node.port

    def files(self) -> list[Path]:
        """Files received and completely written so far, sorted by path.

        storescp appends each file's name to ``received_list`` (``--exec-on-reception``,
        synchronous) only after writing it, so a half-written file is never listed.
        """
        try:
            names = self.received_list.read_text().split()
        except FileNotFoundError:
            return []
        return sorted({self.out_dir / name for name in names})

    def wait_for_files(self, count: int, *, timeout: float) -> list[Path]:
        """Wait until at least ``count`` files have arrived; raise with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.files()
            if len(files) >= count:
                return files
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                state = "exited" if self.proc.poll() is not None else f"waited {timeout} s"
                raise HarnessError(
                    f"storescp {self.ae_title}: {len(files)} of {count} files ({state});"
                    f" log:\n{self.log()}"
                )
            time.sleep(0.02)

    def log(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


@contextmanager
def storescp(
    out_dir: Path,
    *,
    ns: NetNS,
    port: int = 11113,
    ae_title: str = "STORESCP",
    start_timeout: float = 10.0,
    extra_args: Sequence[str] = (),
) -> Iterator[StoreSCP]:
    """Run ``storescp`` inside ``ns`` on ``port``, writing received files into ``out_dir``.

    ``ns`` is required: storescp binds every address, which must only ever be the
    loopback of a namespace of ours. Accepts all transfer syntaxes it knows (``+xa``).
    Stopped (SIGTERM, then SIGKILL) on exit, even when the body raised.
    """
    require_tools("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / f"storescp-{ae_title}-{port}.log"
    received = out_dir.parent / f"storescp-{ae_title}-{port}.received"
    received.unlink(missing_ok=True)
    on_reception = f'echo "#f" >> {shlex.quote(str(received))}'
    argv = [
        "storescp", "-v", "+xa", "-aet", ae_title, "-od", str(out_dir),
        "--exec-on-reception", on_reception, "--exec-sync", *extra_args, str(port),
    ]  # fmt: skip
    with log.open("wb") as log_file:
        proc: subprocess.Popen[bytes] = ns.popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    scp = StoreSCP(proc, DicomNode(LOCALHOST, port, ae_title, ns), out_dir, log, received)
    try:
        try:
            wait_listening(
                proc.pid, port, timeout=start_timeout, alive=lambda: proc.poll() is None,
                what=f"storescp {ae_title}",
            )  # fmt: skip
        except HarnessError as exc:
            raise HarnessError(f"{exc}; log:\n{scp.log()}") from exc
        yield scp
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL and reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
