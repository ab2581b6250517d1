"""The workstation's commands on its control endpoint (relay.ops.control), and the CLI
side of them: `relay workstation reload|stop|status --config FILE`.

Other parts add their commands to the running endpoint (the study cache adds `prefetch`,
`cache-status`, `cache-wipe`, `cache-evict`: relay.workstation.service.workstation_cache);
a handler takes the request's JSON object and returns the answer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import __version__
from relay.ops import control, privatefiles
from relay.ops.config import ConfigError
from relay.ops.instancelock import InstanceLock, InstanceLocked
from relay.ops.reloader import ReloadStopped

if TYPE_CHECKING:
    from relay.workstation.service import Workstation

__all__ = ["COMMANDS", "control_endpoint", "handlers", "run_command"]

log = logging.getLogger(__name__)

COMMANDS = ("reload", "stop", "status")
PROBE_TIMEOUT = 5.0
LOCK_FILE = "workstation.lock"


def handlers(workstation: Workstation, stop: Callable[[], object]) -> dict[str, control.Handler]:
    async def reload(body: dict[str, Any]) -> dict[str, Any]:
        """The outcome of a reload that reads the files after this request (prepared in
        a worker thread: the workstation serves meanwhile; relay.ops.reloader)."""
        try:
            outcome = await workstation.reload()
        except ReloadStopped as exc:
            return {"ok": False, "restart_needed": [], "error": str(exc)}
        answer: dict[str, Any] = {"ok": outcome.ok, "restart_needed": list(outcome.restart_needed)}
        if not outcome.ok:
            answer["error"] = outcome.error
        elif outcome.next_start_error is not None:  # applied, but a restart would fail
            answer["next_start_error"] = outcome.next_start_error
        return answer

    async def stop_command(body: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(stop)  # after this answer is on its way
        return {"ok": True, "grace_s": workstation.config.drain_grace}

    async def status(body: dict[str, Any]) -> dict[str, Any]:
        ready, why = workstation.readiness()
        return {
            "ok": True,
            "pid": os.getpid(),
            "version": __version__,
            "identity": workstation.identity.uri,
            "gateway": str(workstation.config.gateway),
            "ready": ready,
            "why": why,
        }

    return {"reload": reload, "stop": stop_command, "status": status}


def _already_runs(state_dir: Path, pid: object) -> control.ControlError:
    who = f"a workstation (pid {pid})" if pid is not None else "another workstation"
    return control.ControlError(
        f"{who} already runs with the state directory {state_dir}; "
        "stop it (relay workstation stop --config FILE) or set another state_dir"
    )


async def _refuse_a_second_instance(state_dir: Path) -> None:
    """Two workstations on one state directory would fight over it: refuse the second.
    Only an endpoint that proves it holds the secret of control.json is one; anything
    else on its port (a stranger after a crash) must not keep the workstation from
    starting."""
    try:
        answer = await control.call(state_dir, "status", timeout=PROBE_TIMEOUT)
    except control.ForeignEndpoint as exc:
        log.warning("replacing a stale or foreign control endpoint", extra={"why": str(exc)})
        return
    except control.ControlError:
        return  # none, or a stale file from a process that is gone
    raise _already_runs(state_dir, answer.get("pid"))


async def _lock_the_state_dir(state_dir: Path) -> InstanceLock:
    """The OS lock that closes the race the probe leaves open (two started at the same
    instant, neither endpoint written yet: relay.ops.instancelock). Refused, it names the
    holder's pid if its endpoint answers already."""
    lock = InstanceLock(state_dir / LOCK_FILE)
    try:
        lock.acquire()
    except InstanceLocked:
        try:
            answer = await control.call(state_dir, "status", timeout=PROBE_TIMEOUT)
        except control.ControlError:
            answer = {}  # still starting (or stopping): no endpoint to name it by
        raise _already_runs(state_dir, answer.get("pid")) from None
    except OSError as exc:
        raise control.ControlError(f"cannot lock {lock.path}: {exc.strerror or exc}") from None
    return lock


def _prepare(config_path: Path, state_dir: Path) -> None:
    """The state directory exists; made private by us when we create it."""
    if state_dir.is_dir():
        return
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot create {state_dir}: {exc.strerror or exc}"
        raise ConfigError(config_path, "state_dir", message) from None
    privatefiles.protect(state_dir, directory=True)


@contextlib.asynccontextmanager
async def control_endpoint(
    workstation: Workstation, stop: Callable[[], object]
) -> AsyncIterator[control.ControlServer | None]:
    """Serve the workstation's commands while inside (nothing when it has no state_dir)."""
    state_dir = workstation.config.state_dir
    if state_dir is None:
        yield None
        return
    _prepare(workstation.config.path, state_dir)
    lock = await _lock_the_state_dir(state_dir)
    try:
        await _refuse_a_second_instance(state_dir)  # one of a version without the lock
        server = control.ControlServer(state_dir, handlers(workstation, stop))
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
    finally:
        lock.release()  # last: the next workstation may start once this one is gone


def run_command(
    config_path: Path, command: str, *, as_json: bool = False, state_dir: Path | None = None
) -> int:
    """`relay workstation reload|stop|status`: 0 done, 1 refused by the workstation (or a
    reload applied whose restart-only settings the next start would refuse). The
    workstation is found by `state_dir` if given (`--state-dir`: the config file is then
    not read at all), else by the config file's `state_dir` (a regular file only)."""
    from relay.workstation.config import state_dir_of

    where = state_dir if state_dir is not None else state_dir_of(config_path)
    answer = asyncio.run(control.call(where, command))
    if as_json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    if not answer.get("ok"):
        print(f"relay workstation {command}: {answer.get('error', 'failed')}", file=sys.stderr)
        return 1
    next_start = answer.get("next_start_error")
    if as_json:
        return 1 if next_start else 0
    if command == "reload":
        restart = answer.get("restart_needed") or []
        extra = f"; these need a restart: {', '.join(restart)}" if restart else ""
        print(f"reloaded configuration and certificates{extra}")
        if next_start:  # IT must fix the file before the next start, not find out then
            print(
                f"relay workstation reload: the next start will fail: {next_start}", file=sys.stderr
            )
            return 1
    elif command == "stop":
        print(f"stopping (draining for up to {answer.get('grace_s')} s)")
    else:
        state = "ready" if answer.get("ready") else "not ready"
        who = f"pid {answer.get('pid')}, {answer.get('identity')}"
        print(f"running, {who}: {state} ({answer.get('why')})")
    return 0
