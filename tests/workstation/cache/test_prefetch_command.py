"""`relay prefetch`: the control handler (relay/workstation/cache/service.py) counts each
study once and truthfully, and the real CLI (`python -m relay.cli prefetch`, a process)
refuses what is not a UID or too many before it asks, against a real control endpoint
serving a real cache's handlers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from relay.dicom.session import OpenStream
from relay.ops.control import ControlServer
from relay.workstation.cache.cli import MAX_PREFETCH
from relay.workstation.cache.service import WorkstationCache
from relay.workstation.cache.settings import CacheConfig, PrefetchConfig
from relay.workstation.cache.store import CachedInstance

ROOT = Path(__file__).resolve().parents[3]
RELAY = [sys.executable, "-m", "relay.cli"]
BASE = "1.2.826.0.1.3680043.10.1341."


def uids(n: int, width: int = 0) -> list[str]:
    """`n` distinct study UIDs; with `width`, each that many characters long."""
    return [BASE + "1" + str(i).rjust(width - len(BASE) - 1, "0") if width else f"{BASE}{i + 1}"
            for i in range(n)]  # fmt: skip


async def no_stream(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("no network in this test")


def new_cache(tmp_path: Path, queue: int = 2000) -> WorkstationCache:
    """A cache whose prefetcher is not started: what is queued stays in the queue."""
    cache = WorkstationCache(
        CacheConfig(dir=tmp_path / "cache"), PrefetchConfig(queue=queue),
        cast(OpenStream, no_stream), asyncio.Event, account="ws1",
    )  # fmt: skip
    cache.store.open(fresh_key=True)
    return cache


def cache_complete(cache: WorkstationCache, uid: str) -> None:
    cache.store.begin(uid, {}, 1, "test")
    inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{uid}.1", f"{uid}.9",
                          "1.2.840.10008.1.2.1", 0)  # fmt: skip
    cache.store.put(uid, inst, b"x" * 10)
    cache.store.finish(uid, complete=True)


# -- the handler (the control endpoint is a second way in) --------------------------------


async def test_studies_beyond_the_limit_are_counted_as_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = new_cache(tmp_path)
    reply = await cache.cmd_prefetch({"studies": uids(MAX_PREFETCH + 5)})
    assert reply["queued"] == MAX_PREFETCH and reply["refused"] == 5
    assert reply["over_limit"] == 5 and reply["queue_full"] == []
    assert cache.prefetcher.queue.qsize() == MAX_PREFETCH
    assert "5 of 1005 studies refused" in caplog.text


async def test_what_is_not_a_uid_is_refused_not_queued(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    studies = ["notauid", "1.2.3", "1..2", "1.2.3 ", 7, None, ["1.2"], "1" * 65]
    reply = await cache.cmd_prefetch({"studies": studies})
    assert reply["queued"] == 1 and reply["refused"] == reply["invalid"] == 7
    assert cache.prefetcher.pending == {"1.2.3"}


async def test_a_study_named_twice_is_queued_once(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    reply = await cache.cmd_prefetch({"studies": ["1.2.3", "1.2.3"]})
    assert reply["queued"] == 1 and reply["duplicates"] == 1 and reply["refused"] == 0
    assert cache.prefetcher.queue.qsize() == 1


async def test_already_queued_or_cached_and_a_full_queue_are_told_apart(tmp_path: Path) -> None:
    cache = new_cache(tmp_path, queue=2)
    cache_complete(cache, "1.9")
    assert cache.prefetcher.add("1.1", "rule:ct")
    reply = await cache.cmd_prefetch({"studies": ["1.1", "1.9", "1.2", "1.3", "1.4"]})
    # 1.1 was queued by a rule; 1.9 is in the cache (queued again for its priors: the
    # queue is then full), so 1.2, 1.3 and 1.4 find no room
    assert reply["queued"] == 0 and reply["already"] == 2
    assert reply["refused"] == 3 and reply["queue_full"] == ["1.2", "1.3", "1.4"]


async def test_studies_that_are_not_a_list_are_an_error(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    reply = await cache.cmd_prefetch({"studies": "1.2.3"})
    assert reply["ok"] is False and "not a list" in reply["error"]
    assert cache.prefetcher.queue.qsize() == 0


# -- the CLI, a real process, against a real control endpoint ---------------------------


@dataclass
class Running:
    cache: WorkstationCache
    config: Path


@pytest.fixture
async def running(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    """The cache's control handlers on a real endpoint, as the workstation serves them;
    `config` names its state dir, as a workstation's config file does."""
    cache = new_cache(tmp_path, queue=getattr(request, "param", 2000))
    state = tmp_path / "state"
    state.mkdir()
    server = ControlServer(state, cache.handlers())
    await server.start()
    config = tmp_path / "ws.yaml"
    config.write_text(f"state_dir: {json.dumps(str(state))}\n")
    try:
        yield Running(cache, config)
    finally:
        await server.stop()


async def prefetch(running: Running, *studies: str) -> tuple[int, str, str]:
    """`relay prefetch STUDIES --config ...` as a process (the loop keeps serving)."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY, "prefetch", *studies, "--config", str(running.config), cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_argument_that_is_not_a_uid_is_refused_before_asking(running: Running) -> None:
    rc, out, err = await prefetch(running, "1.2.3", "notauid")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "'notauid'" in err and "nothing was queued" in err
    assert running.cache.prefetcher.queue.qsize() == 0


async def test_a_long_bad_argument_is_shown_truncated(running: Running) -> None:
    rc, _, err = await prefetch(running, "1.2." + "x" * 5000)
    assert rc == 2 and err.count("\n") == 1 and len(err) < 300 and "..." in err
    assert running.cache.prefetcher.queue.qsize() == 0


async def test_more_than_the_limit_is_refused_before_asking(running: Running) -> None:
    rc, out, err = await prefetch(running, *uids(MAX_PREFETCH + 1))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and f"at most {MAX_PREFETCH}" in err
    assert running.cache.prefetcher.queue.qsize() == 0


async def test_the_limit_of_the_longest_uids_goes_through(running: Running) -> None:
    """1000 UIDs of 64 characters are more than one control request carries (64 KiB)."""
    studies = uids(MAX_PREFETCH, width=64)
    assert all(len(u) == 64 for u in studies)
    rc, out, err = await prefetch(running, *studies)
    assert (rc, out, err) == (0, f"queued {MAX_PREFETCH} studies\n", "")
    assert running.cache.prefetcher.pending == set(studies)


@pytest.mark.parametrize("running", [1], indirect=True)
async def test_a_full_queue_names_what_was_refused_and_exits_1(running: Running) -> None:
    rc, out, err = await prefetch(running, "1.2.3", "1.2.4", "1.2.3")
    assert rc == 1
    assert out == "queued 1 study, 1 named twice, 1 refused\n"
    assert err == "refused (the workstation's prefetch queue is full): 1.2.4\n"
    assert running.cache.prefetcher.pending == {"1.2.3"}


async def test_already_queued_is_not_counted_as_queued(running: Running) -> None:
    assert running.cache.prefetcher.add("1.2.3", "rule:ct")
    rc, out, err = await prefetch(running, "1.2.3", "1.2.5")
    assert (rc, out, err) == (0, "queued 1 study, 1 already queued or cached\n", "")
