"""Stop and reload by signal on every platform the ends run on.

POSIX: `loop.add_signal_handler`, as every role has always done: SIGTERM and SIGINT stop,
SIGHUP reloads. Windows has neither `add_signal_handler` (the Proactor loop raises
NotImplementedError) nor SIGHUP; there `signal.signal` handlers for SIGINT (Ctrl-C),
SIGBREAK (Ctrl-Break) and SIGTERM hand the stop over to the loop with
`call_soon_threadsafe`, which wakes it (the Proactor loop installs a wakeup fd; on POSIX
the interrupted wait is retried after the handler, PEP 475). The same drain follows
either way. Without SIGHUP, a reload goes through the control endpoint
(`relay workstation reload`, relay.ops.control).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["RELOAD_SIGNALS", "STOP_SIGNALS", "handling_signals"]

# By name: SIGBREAK exists only on Windows, SIGHUP only on POSIX.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGBREAK")
RELOAD_SIGNALS = ("SIGHUP",)


def _present(names: tuple[str, ...]) -> list[signal.Signals]:
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


@contextlib.contextmanager
def handling_signals(
    loop: asyncio.AbstractEventLoop,
    *,
    stop: Callable[[], object],
    reload: Callable[[], object] | None = None,
) -> Iterator[list[str]]:
    """Call `stop` on a stop signal and `reload` on SIGHUP while inside; yield the names
    of the signals handled. Previous handlers come back on exit. Both run on the loop, so
    they must return at once: `reload` only asks for one (relay.ops.reloader.Reloader)."""
    plan: list[tuple[signal.Signals, Callable[[], object]]] = [
        (sig, stop) for sig in _present(STOP_SIGNALS)
    ]
    if reload is not None:
        plan += [(sig, reload) for sig in _present(RELOAD_SIGNALS)]
    on_loop: list[signal.Signals] = []
    previous: dict[signal.Signals, signal._HANDLER] = {}
    in_main_thread = threading.current_thread() is threading.main_thread()
    for sig, callback in plan:
        try:
            loop.add_signal_handler(sig, callback)
        except NotImplementedError:
            if not in_main_thread:  # signal.signal works in the main thread only
                continue
            previous[sig] = signal.signal(sig, _handing_over(loop, callback))
        else:
            on_loop.append(sig)
    try:
        yield [sig.name for sig in on_loop + list(previous)]
    finally:
        for sig in on_loop:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handing_over(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], object]
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(callback)

    return handler
