"""The portable lane: this process (and every child that inherits PYTHONPATH) looks like
the radiologist's Windows PC in what matters to the ends.

Active only with RELAY_PORTABLE_LANE=1 (`make test-portable` sets it):

- `import uvloop` fails (pyproject leaves uvloop out on Windows);
- `signal.SIGHUP` does not exist;
- `loop.add_signal_handler` / `remove_signal_handler` raise NotImplementedError, as on
  the Proactor loop;
- POSIX modes are not a protection mechanism there, so code of this repository (relay/,
  tests/) may not call chmod: only relay/ops/privatefiles.py, the one module that knows
  each platform's means, may. Third-party code (pytest's temporary directories...) may.

`relay gateway` and `relay agent` child processes are left as they are: they are Linux
services (DESIGN.md section 12 is about the PC), started here only to talk to.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
from typing import Any

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_OURS = (str(_ROOT / "relay") + os.sep, str(_ROOT / "tests") + os.sep)
_ALLOWED = str(_ROOT / "relay" / "ops" / "privatefiles.py")
_SERVICES = {"gateway", "agent"}


def _is_linux_service() -> bool:
    """`python -m relay.cli gateway|agent ...` or `relay gateway|agent ...`."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    for i, arg in enumerate(argv):
        if arg == "relay.cli" or os.path.basename(arg) in {"relay", "relay.exe"}:
            return i + 1 < len(argv) and argv[i + 1] in _SERVICES
    return False


def _no_signal_handlers(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("portable lane: no loop signal handlers (as on Windows)")


def _guard(name: str, real: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(_OURS) and caller != _ALLOWED:
            raise AssertionError(
                f"portable lane: {name}() called from {caller}: POSIX modes protect nothing "
                "on Windows; go through relay.ops.privatefiles"
            )
        return real(*args, **kwargs)

    return guarded


def _apply() -> None:
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # import uvloop -> ImportError
    if hasattr(signal, "SIGHUP"):
        del signal.SIGHUP
    classes: list[type] = [asyncio.BaseEventLoop, asyncio.AbstractEventLoop]
    if sys.platform != "win32":
        from asyncio import unix_events

        classes.append(unix_events._UnixSelectorEventLoop)
    for cls in classes:
        setattr(cls, "add_signal_handler", _no_signal_handlers)  # noqa: B010
        setattr(cls, "remove_signal_handler", _no_signal_handlers)  # noqa: B010
    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            setattr(os, name, _guard(f"os.{name}", getattr(os, name)))
    pathlib.Path.chmod = _guard("Path.chmod", pathlib.Path.chmod)  # type: ignore[method-assign]
    os.environ["RELAY_PORTABLE_LANE_ACTIVE"] = "1"


if os.environ.get("RELAY_PORTABLE_LANE") == "1" and not _is_linux_service():
    _apply()
