"""A real Orthanc PACS in a network namespace of its own, driven over its REST API.

Orthanc 1.10 binds every address for DICOM and HTTP, so it only ever runs inside a
``NetNS`` that has nothing but ``lo``. Its REST API is reached from this process through
a socket created inside that namespace (``NetNS.create_connection``): nothing is
reachable from outside, and no curl/python subprocess is needed per call.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from .dcmtk import LOCALHOST, DicomNode, stop_process, storescu
from .netns import NetNS
from .tools import HarnessError, require_tools, tail, wait_listening

REST_TIMEOUT = 30.0  # seconds for one REST call
START_TIMEOUT = 30.0  # seconds for Orthanc to answer after start
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class OrthancError(HarnessError):
    """Orthanc answered a REST call with an HTTP error."""


@dataclass(frozen=True)
class Modality:
    """A DICOM peer that Orthanc knows (C-MOVE destinations must be known)."""

    ae_title: str
    host: str
    port: int

    def as_json(self) -> dict[str, Any]:
        return {"AET": self.ae_title, "Host": self.host, "Port": self.port}


class _NsHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket lives in a given network namespace."""

    def __init__(self, ns: NetNS, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = self._ns.create_connection(self.host, self.port, timeout=self.timeout or 10)


class Orthanc:
    """One Orthanc process inside ``ns``, with its config, storage and log in ``workdir``.

    ``start()``/``stop()`` or use as a context manager. ``modalities`` maps Orthanc's
    symbolic names to peers; ``config_overrides`` is merged last into the JSON config.
    """

    def __init__(
        self,
        ns: NetNS,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        dicom_port: int = 4242,
        http_port: int = 8042,
        modalities: Mapping[str, Modality] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        start_timeout: float = START_TIMEOUT,
        verbose: bool = False,
    ) -> None:
        self.ns = ns
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.host = LOCALHOST
        self.base_modalities: dict[str, Modality] = dict(modalities or {})
        self.config_overrides = dict(config_overrides or {})
        self.start_timeout = start_timeout
        self.verbose = verbose
        self.config_path = workdir / "orthanc.json"
        self.storage_dir = workdir / "storage"
        self.log_path = workdir / "orthanc.log"
        self.console_path = workdir / "orthanc.console"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- configuration and lifecycle -------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": f"dmzr-{self.ns.name}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {n: m.as_json() for n, m in self.base_modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "StableAge": 1,
            "SaveJobs": False,
            "HttpTimeout": 30,
        }
        config.update(self.config_overrides)
        return config

    def start(self) -> Self:
        """Write the config, start Orthanc, and wait until REST and DICOM answer."""
        require_tools("Orthanc")
        if self.running:
            raise HarnessError("Orthanc already started")
        self.stop()  # reap a process that died on its own
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = ["Orthanc", f"--logfile={self.log_path}"]
        if self.verbose:
            argv.append("--verbose")
        argv.append(str(self.config_path))
        with self.console_path.open("wb") as console:
            self.proc = self.ns.popen(
                argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        proc = self.proc
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while True:
            if proc.poll() is not None:
                raise HarnessError(
                    f"Orthanc exited with code {proc.returncode} during start-up\n{self.logs()}"
                )
            try:
                self.rest("GET", "/system", timeout=2.0)
                break
            except (OSError, http.client.HTTPException, OrthancError) as exc:
                last_error = str(exc)
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"Orthanc did not answer REST within {self.start_timeout} s"
                    f" ({last_error})\n{self.logs()}"
                )
            time.sleep(0.05)
        try:
            wait_listening(
                proc.pid, self.dicom_port, timeout=max(1.0, deadline - time.monotonic()),
                alive=lambda: proc.poll() is None, what="Orthanc DICOM server",
            )  # fmt: skip
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{self.logs()}") from exc

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Orthanc. Idempotent.

        By default SIGKILL: a clean Orthanc shutdown takes ~3.5 s (its HTTP and DICOM
        servers poll for the stop flag) and the storage is thrown away anyway. Use
        ``graceful=True`` (SIGTERM, SIGKILL after ``STOP_GRACE``) to restart Orthanc on
        the same storage.
        """
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if graceful:
            stop_process(proc, STOP_GRACE)
        elif proc.poll() is None:
            proc.kill()
            proc.wait(STOP_GRACE)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def logs(self, lines: int = 40) -> str:
        """The tail of Orthanc's log and console output, for error messages."""
        return (
            f"--- {self.log_path} (tail)\n{tail(self.log_path, lines)}\n"
            f"--- {self.console_path} (tail)\n{tail(self.console_path, lines)}"
        )

    # -- DICOM -----------------------------------------------------------------------

    @property
    def node(self) -> DicomNode:
        """Orthanc's DICOM server, for the ``dcmtk`` functions (run inside ``ns``)."""
        return DicomNode(self.host, self.dicom_port, self.ae_title, self.ns)

    # -- REST ------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
        *,
        timeout: float = REST_TIMEOUT,
    ) -> Any:
        """Call Orthanc's REST API from inside its namespace.

        ``body``: bytes are sent as-is (e.g. a DICOM file to POST /instances), str as
        text, mappings and lists as JSON. Returns parsed JSON when Orthanc answers JSON,
        else the raw bytes. Raises ``OrthancError`` for an HTTP status >= 400.
        """
        headers: dict[str, str] = {}
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data, headers["Content-Type"] = body, "application/octet-stream"
        elif isinstance(body, str):
            data, headers["Content-Type"] = body.encode(), "text/plain"
        else:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn = _NsHTTPConnection(self.ns, self.host, self.http_port, timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if response.status >= 400:
            text = payload.decode(errors="replace")[:2000]
            raise OrthancError(f"{method} {path}: HTTP {response.status}: {text}")
        if "json" in (response.getheader("Content-Type") or "") and payload:
            return json.loads(payload)
        return payload

    def upload(self, paths: Iterable[Path], *, via: Literal["dicom", "rest"] = "dicom") -> None:
        """Store files in Orthanc: C-STORE with storescu (default) or REST POST /instances.

        Directories are sent recursively with ``dicom``; ``rest`` takes files only.
        """
        items = list(paths)
        if via == "dicom":
            storescu(self.node, items)
            return
        for path in items:
            self.rest("POST", "/instances", path.read_bytes())

    def instances(self) -> list[str]:
        """SOP Instance UIDs of every stored instance, sorted."""
        found = self.rest("GET", "/instances?expand")
        return sorted(item["MainDicomTags"]["SOPInstanceUID"] for item in found)

    def clear(self) -> None:
        """Delete every patient (and so every study, series, instance)."""
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def add_modality(self, ae_title: str, host: str, port: int, *, name: str | None = None) -> None:
        """Make a peer known to Orthanc (under ``name``, default the AE title) at run time."""
        modality = Modality(ae_title, host, port)
        self.rest("PUT", f"/modalities/{name or ae_title}", modality.as_json())

    def remove_modality(self, name: str) -> None:
        self.rest("DELETE", f"/modalities/{name}")

    def modalities(self) -> list[str]:
        """Symbolic names of the peers Orthanc knows."""
        return sorted(self.rest("GET", "/modalities"))

    def reset(self) -> None:
        """Back to the state after start: no instances, only the configured modalities."""
        self.clear()
        for name in self.modalities():
            if name not in self.base_modalities:
                self.remove_modality(name)
        for name, modality in self.base_modalities.items():
            self.add_modality(modality.ae_title, modality.host, modality.port, name=name)


@contextmanager
def run_orthanc(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    """Orthanc in a fresh namespace of its own; both are gone on exit, even on failure.

    ``kwargs`` go to ``Orthanc`` (ae_title, modalities, config_overrides, verbose...).
    """
    with NetNS() as ns, Orthanc(ns, workdir, **kwargs) as orthanc:
        yield orthanc
