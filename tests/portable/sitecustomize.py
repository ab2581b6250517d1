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
- SO_REUSEADDR lets a second socket bind a port in use on Windows: a socket that our code
  (relay/), or pynetdicom on its behalf, gave SO_REUSEADDR may not listen. The socket
  module has SO_EXCLUSIVEADDRUSE, as on Windows (set, it is Linux's SO_REUSEADDR, which
  admits no second listener either). Servers that stand in for the hospital's machines
  (relay_dev/, tests/) and asyncio's own (SO_REUSEADDR on POSIX only) are left alone.

`relay gateway` and `relay agent` child processes are left as they are: they are Linux
services (DESIGN.md section 12 is about the PC), started here only to talk to.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sys
import weakref
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


_RELAY = str(_ROOT / "relay") + os.sep
_STAND_INS = (str(_ROOT / "relay_dev") + os.sep, str(_ROOT / "tests") + os.sep)
_PYNETDICOM = os.sep + "pynetdicom" + os.sep
_EXCLUSIVEADDRUSE = ~socket.SO_REUSEADDR  # its value on Windows


def _shares_the_port(frame: Any) -> bool:
    """SO_REUSEADDR set by relay/, or by pynetdicom for relay/ (not for a stand-in)."""
    caller = frame.f_code.co_filename
    if caller.startswith(_RELAY):
        return True
    if _PYNETDICOM not in caller:
        return False
    while frame is not None:  # whose server: the nearest frame of our code or a stand-in
        name = frame.f_code.co_filename
        if name.startswith(_RELAY):
            return True
        if name.startswith(_STAND_INS):
            return False
        frame = frame.f_back
    return True  # a worker thread (asyncio.to_thread): only relay/ starts servers so


def _guard_shared_ports() -> None:
    shared: weakref.WeakSet[socket.socket] = weakref.WeakSet()
    real_setsockopt = socket.socket.setsockopt
    real_listen = socket.socket.listen

    def setsockopt(self: socket.socket, level: int, option: int, *args: Any) -> None:
        if level == socket.SOL_SOCKET and option == _EXCLUSIVEADDRUSE:
            return real_setsockopt(self, level, socket.SO_REUSEADDR, *args)
        reuse = level == socket.SOL_SOCKET and option == socket.SO_REUSEADDR
        if reuse and args and args[0] and _shares_the_port(sys._getframe(1)):
            shared.add(self)
        return real_setsockopt(self, level, option, *args)

    def listen(self: socket.socket, *args: Any) -> None:
        if self in shared:
            raise AssertionError(
                "portable lane: a listening socket with SO_REUSEADDR: on Windows a second "
                "process could bind the same port; bind with SO_EXCLUSIVEADDRUSE "
                "(relay.dicom.exclusive)"
            )
        return real_listen(self, *args)

    socket.SO_EXCLUSIVEADDRUSE = _EXCLUSIVEADDRUSE  # type: ignore[attr-defined]
    socket.socket.setsockopt = setsockopt  # type: ignore[method-assign,assignment]
    socket.socket.listen = listen  # type: ignore[method-assign,assignment]


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
    if not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
        _guard_shared_ports()
    os.environ["RELAY_PORTABLE_LANE_ACTIVE"] = "1"


if os.environ.get("RELAY_PORTABLE_LANE") == "1" and not _is_linux_service():
    _apply()
