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


def prefetch(config_path: Path, studies: list[str]) -> int:
    reply = call(config_path, "prefetch", {"studies": studies})
    print(f"queued {reply['queued']} studies" + (f", {reply['refused']} refused (queue full)"
                                                  if reply["refused"] else ""))  # fmt: skip
    return 0 if not reply["refused"] else 1


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
