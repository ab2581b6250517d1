"""`relay prefetch` and `relay cache status|wipe|evict`: talk to the running workstation.

Patient-free by default: studies are shown by label ("study 3"), modality, size, age and
source; `--names` adds the patient name, description and study UID.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from relay.ops.control import ControlError


def call(config_path: Path, command: str, body: dict[str, Any]) -> dict[str, Any]:
    """One command on the running workstation's control endpoint (relay.ops.control)."""
    import asyncio

    from relay.ops import control
    from relay.workstation.config import state_dir_of

    answer = asyncio.run(control.call(state_dir_of(config_path), command, body))
    if not answer.get("ok"):
        raise ControlError(f"{command}: {answer.get('error', 'refused')}")
    return answer


MAX_PREFETCH = 1000  # study UIDs one `relay prefetch` (and one control request) may name
# What one control request carries at most (relay.ops.control.MAX_REQUEST is 64 KiB; 1000
# UIDs of 64 characters, quoted, are 67 KB): a longer list goes as two requests.
BATCH_BYTES = 60_000


def bad_uid(value: str) -> str | None:
    """Why `value` is not a study UID (None when it is): shown truncated and quoted, so a
    long or odd argument stays one line."""
    from relay.dicom.uids import is_conformant_uid

    if is_conformant_uid(value):
        return None
    shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"not a DICOM UID (digits in dot-separated parts, at most 64): {shown}"


def prefetch(config_path: Path, studies: list[str]) -> int:
    """Queue `studies` in the running workstation's cache: 2 before asking it when an
    argument is not a UID or there are over MAX_PREFETCH; 1 when it refused some (its
    queue was full), which are named on stderr, so a script notices."""
    for uid in studies:
        problem = bad_uid(uid)
        if problem is not None:
            print(f"relay: prefetch: {problem}; nothing was queued", file=sys.stderr)
            return 2
    unique = list(dict.fromkeys(studies))
    if len(unique) > MAX_PREFETCH:
        print(f"relay: prefetch: {len(unique)} studies at once, at most {MAX_PREFETCH}; "
              "nothing was queued (split the list)", file=sys.stderr)  # fmt: skip
        return 2
    total: dict[str, Any] = {"queued": 0, "already": 0, "refused": 0, "invalid": 0,
                             "over_limit": 0, "queue_full": []}  # fmt: skip
    sent = 0
    for batch in _batches(unique):
        try:
            reply = call(config_path, "prefetch", {"studies": batch})
        except ControlError as exc:
            if not sent:
                raise
            raise ControlError(
                f"{exc}; the first {sent} of {len(unique)} studies were sent "
                f"({total['queued']} queued), the other {len(unique) - sent} were not"
            ) from None
        sent += len(batch)
        for key in ("queued", "already", "refused", "invalid", "over_limit"):
            total[key] += int(reply.get(key, 0))
        total["queue_full"] += [str(u) for u in reply.get("queue_full", [])]
    full: list[str] = total["queue_full"]
    refused: int = total["refused"]
    parts = [f"queued {total['queued']} {_studies(total['queued'])}"]
    if total["already"]:
        parts.append(f"{total['already']} already queued or cached")
    if len(studies) > len(unique):
        parts.append(f"{len(studies) - len(unique)} named twice")
    if refused:
        parts.append(f"{refused} refused")
    print(", ".join(parts))
    for uid in full:
        print(f"refused (the workstation's prefetch queue is full): {uid}", file=sys.stderr)
    if refused > len(full):
        print(f"refused by the workstation, not named: {refused - len(full)} "
              f"({total['invalid']} not a study UID, {total['over_limit']} over its limit "
              f"of {MAX_PREFETCH} at once)", file=sys.stderr)  # fmt: skip
    return 1 if refused else 0


def _batches(studies: list[str]) -> list[list[str]]:
    """`studies` in requests of at most BATCH_BYTES of JSON each."""
    batches: list[list[str]] = [[]]
    size = 0
    for uid in studies:
        entry = len(json.dumps(uid)) + 2
        if batches[-1] and size + entry > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(uid)
        size += entry
    return batches


def _studies(n: int) -> str:
    return "study" if n == 1 else "studies"


def status(config_path: Path, *, as_json: bool, names: bool) -> int:
    reply = call(config_path, "cache-status", {"names": names})
    if as_json:
        json.dump(reply, sys.stdout, indent=2)
        print()
        return 0
    _render(reply, names)
    return 0


def _replace_unencodable() -> None:
    """A patient's name need not fit the output's code page (cp1252 when redirected on
    Windows): show `?` for what does not, rather than fail the whole listing."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")


def _render(reply: dict[str, Any], names: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    _replace_unencodable()
    console = Console()
    table = Table(title=f"cache: {_size(reply['bytes'])} of {_size(reply['max_bytes'])}, "
                        f"{reply['queued']} queued")  # fmt: skip
    for col in ("study", "state", "instances", "size", "age", "source"):
        table.add_column(col)
    if names:
        table.add_column("patient")
    for s in reply["studies"]:
        done = f"{s['instances']}/{s['expected'] if s['expected'] is not None else '?'}"
        row = [f"{s['label']} {s['modalities']}".strip(), s["state"], done, _size(s["bytes"]),
               _age(s["age_s"]), s["source"]]  # fmt: skip
        if names:
            row.append(f"{s.get('patient', '')} {s.get('description', '')}".strip())
        table.add_row(*row)
    console.print(table)
    filling = [s for s in reply["studies"] if s["state"] == "filling" and s["expected"]]
    if filling:
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), console=console,
                      auto_refresh=False) as bars:  # fmt: skip
            for s in filling:
                bars.add_task(s["label"], total=s["expected"], completed=s["instances"])
            bars.refresh()


def wipe(config_path: Path) -> int:
    reply = call(config_path, "cache-wipe", {})
    print(f"wiped {reply['wiped']} studies")
    return 0


def evict(config_path: Path, studies: list[str]) -> int:
    reply = call(config_path, "cache-evict", {"studies": studies})
    print(f"evicted {reply['evicted']} studies")
    return 0 if reply["evicted"] == len(studies) else 1


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
