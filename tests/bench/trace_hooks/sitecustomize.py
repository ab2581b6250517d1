"""Timestamps at each hop of a relayed retrieval, for `python -m tests.bench.first_trace`.

Python imports `sitecustomize` at start-up from its path; the tracer puts this directory
first on the PYTHONPATH of the processes it starts and names a directory in
FIRST_TRACE_DIR. Nothing happens without that variable. Each process then appends
`<monotonic ns> <hop> <detail>` lines to FIRST_TRACE_DIR/trace-<pid>.txt as the relay's
DICOM modules reach these points (wrapped when they are first imported; a bench tool,
never loaded by the product):

- workstation: `ws.get` (the node's C-GET handler begins), `ws.read` (a message off the
  stream: its type and size), `ws.next` (decoded on the handler thread), `ws.deliver`
  (an instance handed to pynetdicom for the viewer);
- agent: `agent.request` (read), `agent.store` (a PACS C-STORE at the intake), `agent.count`
  (the PACS's count queued), `agent.encoded` (codec, CPU us, bytes), `agent.written`.

CLOCK_MONOTONIC is one clock for every process of the machine, so the lines of all of
them and the tracer's own (getscu's launch) sort into one timeline.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_DIR = os.environ.get("FIRST_TRACE_DIR", "")
_lock = threading.Lock()
_out: list[Any] = []


def mark(hop: str, detail: str = "") -> None:
    """Append one line (opened on first use, line-buffered)."""
    now = time.monotonic_ns()
    with _lock:
        if not _out:
            path = os.path.join(_DIR, f"trace-{os.getpid()}.txt")
            _out.append(open(path, "a", buffering=1, encoding="ascii"))  # noqa: SIM115
        _out[0].write(f"{now} {hop} {detail}\n")


def _node(m: ModuleType) -> None:
    run, deliver = m._Retrieval.run, m._Retrieval._deliver

    def traced_run(self: Any) -> Any:
        mark("ws.get")
        yield from run(self)

    def traced_deliver(self: Any, inst: Any) -> Any:
        mark("ws.deliver")
        return deliver(self, inst)

    m._Retrieval.run, m._Retrieval._deliver = traced_run, traced_deliver


def _session(m: ModuleType) -> None:
    read, step = m.read_payload, m.Session.next

    async def traced_read(*args: Any, **kw: Any) -> Any:
        payload = await read(*args, **kw)
        if payload is not None and len(payload) > 1:
            mark("ws.read", f"{m.MessageType(payload[1]).name} {len(payload)}")
        return payload

    def traced_next(self: Any, timeout: float) -> Any:
        msg = step(self, timeout)
        mark("ws.next", type(msg).__name__)
        return msg

    setattr(m, "read_payload", traced_read)  # noqa: B010 - the module's own binding, replaced
    m.Session.next = traced_next


def _agent(m: ModuleType) -> None:
    expect = m._expect

    async def traced_expect(*args: Any, **kw: Any) -> Any:
        got = await expect(*args, **kw)
        mark("agent.request", type(got).__name__)
        return got

    setattr(m, "_expect", traced_expect)  # noqa: B010 - the module's own binding, replaced


def _pacs_ops(m: ModuleType) -> None:
    on_store, emit = m.PacsOperation._on_store, m.PacsOperation._emit

    def traced_store(self: Any, event: Any) -> Any:
        mark("agent.store")
        return on_store(self, event)

    def traced_emit(self: Any, msg: Any) -> Any:
        if type(msg).__name__ == "Pending":
            mark("agent.count")
        return emit(self, msg)

    m.PacsOperation._on_store, m.PacsOperation._emit = traced_store, traced_emit


def _encoder(m: ModuleType) -> None:
    encode, written = m.StreamEncoder.encode, m.StreamEncoder.written

    def traced_encode(self: Any, msg: Any) -> Any:
        started = time.thread_time_ns()
        got = encode(self, msg)
        if got.raw:
            cpu = (time.thread_time_ns() - started) // 1000
            mark("agent.encoded", f"{got.codec} {cpu} {len(got.frame)}")
        return got

    def traced_written(self: Any, result: Any, *args: Any, **kw: Any) -> Any:
        if result.raw:
            mark("agent.written", result.codec)
        return written(self, result, *args, **kw)

    m.StreamEncoder.encode, m.StreamEncoder.written = traced_encode, traced_written


HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "relay.dicom.node": _node,
    "relay.dicom.session": _session,
    "relay.dicom.agent": _agent,
    "relay.dicom.pacs_ops": _pacs_ops,
    "relay.dicom.encoder": _encoder,
}


class _Loader(importlib.abc.Loader):
    """Runs the module as its own loader would, then wraps its hops."""

    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner, self.name = inner, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        HOOKS[self.name](module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None


if _DIR:
    sys.meta_path.insert(0, _Finder())
