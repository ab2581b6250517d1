"""Measure the path of one DICOM operation through the relay's own modules.

`trace()` records every Python call made while a block runs, on every thread (the
profiler hook is installed for threads started inside the block, which is where
pynetdicom's association threads come from), and attributes each call to the nearest
project frame below it on the same stack: a call made by asyncio or pynetdicom on behalf
of one of our modules counts for that module, and work with no project frame below it
(a thread's or a task's entry point) only counts its callee. What is reported:

- `files`: the product's source files that ran;
- `edges`: (caller module, callee module) -> number of calls that crossed between them;
- `cycles`: groups of modules that call each other, directly or round a loop: a module
  calling back up into its caller's module shows here;
- `hops`: calls that crossed a module boundary (each one returns, so hops are also the
  returns), in total.

`python -m tests.dicom.path_trace` runs one C-GET of a small study through the in-process
chain (DicomNode -> in-memory stream -> agent -> embedded PACS) and prints the numbers that
docs/internals/dicom.md quotes. The transport between the ends (relay/net, relay/proto,
the gateway) is not part of this chain; the DICOM layer only sees a ByteStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = ("relay", "gateway")
# Pass-through frames that only hand over to pynetdicom: what pynetdicom then calls is
# pynetdicom's doing (the embedded PACS of the chain runs in this process, through it).
_TRANSPARENT = frozenset({("relay.dicom.move_check", "_move_scp")})


@functools.lru_cache(maxsize=4096)
def module_of(filename: str) -> str | None:
    """ "relay/dicom/node.py" -> "relay.dicom.node"; None outside the product."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    if not rel.parts or rel.parts[0] not in _PACKAGES or rel.suffix != ".py":
        return None
    return ".".join(rel.with_suffix("").parts)


@dataclass
class Trace:
    files: set[str] = field(default_factory=set)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def hops(self) -> int:
        return sum(self.edges.values())

    def modules(self, prefix: str = "") -> set[str]:
        return {m for m in self.files if m.startswith(prefix)}

    def within(self, prefix: str) -> Counter[tuple[str, str]]:
        return Counter(
            {
                (a, b): n
                for (a, b), n in self.edges.items()
                if a.startswith(prefix) and b.startswith(prefix)
            }
        )

    def cycles(self, prefix: str = "") -> list[set[str]]:
        """Strongly connected groups of more than one module (Tarjan)."""
        graph: dict[str, set[str]] = {}
        for a, b in self.within(prefix):
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        out: list[set[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in graph[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group: set[str] = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.add(w)
                    if w == v:
                        break
                if len(group) > 1:
                    out.append(group)

        for v in sorted(graph):
            if v not in index:
                visit(v)
        return out


@contextlib.contextmanager
def trace() -> Iterator[Trace]:
    """Record calls between product modules, on this thread and threads started inside."""
    result = Trace()
    lock = threading.Lock()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = module_of(frame.f_code.co_filename)
        if callee is None:
            return
        caller: str | None = None
        back = frame.f_back
        while back is not None:
            caller = module_of(back.f_code.co_filename)
            if (caller, back.f_code.co_name) in _TRANSPARENT:
                caller = None
                break
            if caller is not None:
                break
            back = back.f_back
        with lock:
            result.files.add(callee)
            if caller is not None and caller != callee:
                result.edges[(caller, callee)] += 1

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        yield result
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


async def measure_get(instances: int = 4, *, agent_retrieve: str = "get") -> Trace:
    """One C-GET of an `instances`-image study, viewer -> node -> agent -> PACS and back,
    twice: the second on the spare association the first left (relay.dicom.spare).

    `agent_retrieve`: how the agent takes the study from the PACS, "get" or "move" (then
    through its C-MOVE receiver)."""
    from relay.dicom import rawds
    from relay.dicom.intake import MoveReceiver
    from relay.dicom.pacs_target import PacsTarget
    from relay.dicom.spare import SpareAssociation
    from relay_dev import samples
    from relay_dev.pacs import EmbeddedPacs, MemoryStore

    from . import viewer
    from .chain import Chain
    from .helpers import EXPLICIT, query

    study = samples.make_study(instances, rows=16, cols=16, seed=91)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study)) as pacs, trace() as t:
        receiver: MoveReceiver | None = None
        extra: dict[str, Any] = {}
        if agent_retrieve == "move":
            receiver = MoveReceiver("RELAYMOVE", ("127.0.0.1", 0), timeout=10)
            receiver.start()
            pacs.destinations["RELAYMOVE"] = ("127.0.0.1", receiver.port)
            extra = {"retrieve": "move", "move_ae_title": "RELAYMOVE",
                     "move_listen": ("127.0.0.1", receiver.port)}  # fmt: skip
        target = PacsTarget(
            ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10, **extra
        )
        spare = SpareAssociation(10)
        chain = Chain(target, move_receiver=receiver, spare=spare)
        await chain.start()
        results = []
        try:
            for _ in range(2):
                results.append(
                    await asyncio.to_thread(
                        viewer.get,
                        chain.port,
                        query("STUDY", StudyInstanceUID=uid),
                        classes=[samples.CT_IMAGE_STORAGE],
                    )
                )
                await chain.settle()
                try:
                    async with asyncio.timeout(10):  # the spare opens on a thread of its own
                        while spare.counts()["opened"] < len(results):  # noqa: ASYNC110
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    pytest.fail(f"no spare opened after retrieve {len(results)}: {spare.counts()}")
        finally:
            await chain.stop()
            spare.close()
            if receiver is not None:
                receiver.stop()
    for result in results:
        assert len(result.received) == instances and result.final.Status == 0
    assert spare.counts()["used"] == 1
    return t


def report(t: Trace, prefix: str = "relay.dicom") -> str:
    lines = [f"files that ran: {len(t.files)}"]
    lines += [f"  {m}" for m in sorted(t.files)]
    inner = t.within(prefix)
    lines.append(f"calls between {prefix} modules: {sum(inner.values())} "
                 f"over {len(inner)} caller->callee pairs")  # fmt: skip
    lines += [f"  {a} -> {b}: {n}" for (a, b), n in sorted(inner.items())]
    cycles = t.cycles(prefix)
    lines.append(f"modules calling each other (cycles): {len(cycles)}")
    lines += [f"  {sorted(c)}" for c in cycles]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a measuring tool
    for how in ("get", "move"):
        print(f"== a viewer's C-GET of 4 instances; the agent retrieves by C-{how.upper()}")
        print(report(asyncio.run(measure_get(agent_retrieve=how))))
