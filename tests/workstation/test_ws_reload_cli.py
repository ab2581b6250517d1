"""`relay workstation reload|stop|status --config FILE` finds the running workstation
without reading a config file that is not a regular file (relay.workstation.config
state_dir_of, relay.cli `--state-dir`).

The command read the config file itself for its `state_dir`. With a FIFO config (a
secrets tool feeding it) that read took the contents meant for the workstation's own
reload, which then read nothing, or waited the FIFO's 10 s deadline when nobody wrote.
Now such a file is refused at once with a message naming `--state-dir`, and with
`--state-dir` the config file is not read at all: what is fed goes to the workstation.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay import cli
from tests.ends_helpers import WAIT
from tests.reload_helpers import HAS_FIFO, feed, held_reader_async, make_fifo
from tests.workstation.test_ws_reload_off_loop import workstation_with_signals

fifo_only = pytest.mark.skipif(not HAS_FIFO, reason="FIFOs are POSIX")


async def relay(*argv: str) -> int:
    """`relay ...` in this process (its own event loop, in a thread: ours runs the
    workstation meanwhile)."""
    return await asyncio.wait_for(asyncio.to_thread(cli.main, list(argv)), WAIT)


def _no_reader(fifo: Path) -> bool:
    """Nobody holds the FIFO open for reading (its write end cannot be opened)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return True
    return False


@fifo_only
async def test_a_fifo_config_is_not_read_by_the_command_and_state_dir_finds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with workstation_with_signals(tmp_path) as running:
        make_fifo(running.config)
        # Without --state-dir: refused at once, naming the option; the FIFO never opened
        # (the old command opened it and waited for a writer, then failed).
        assert await relay("workstation", "reload", "--config", str(running.config)) == 2
        err = capsys.readouterr().err
        assert "not a regular file" in err and "--state-dir" in err
        assert _no_reader(running.config) and running.ws.reloader.prepares == 0

        # With it: the workstation's own reload is the one that reads what is fed.
        asked = asyncio.ensure_future(
            relay("workstation", "reload", "--config", str(running.config),
                  "--state-dir", str(running.state))
        )  # fmt: skip
        writer = await held_reader_async(running.config)
        feed(writer, running.text.replace("1s\n", "3s\n"))
        assert await asyncio.wait_for(asked, WAIT) == 0
        assert running.ws.config.drain_grace == 3.0 and running.ws.reloads.ok == 1
        assert "reloaded configuration and certificates" in capsys.readouterr().out


async def test_state_dir_finds_the_workstation_without_reading_the_config_on_every_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a regular file (here a directory, which every platform has) is refused with
    the option named; `--state-dir` does not read `--config` at all (here: gone)."""
    async with workstation_with_signals(tmp_path) as running:
        odd = tmp_path / "a-directory.yaml"
        odd.mkdir()
        assert await relay("workstation", "status", "--config", str(odd)) == 2
        assert "--state-dir" in capsys.readouterr().err
        gone = tmp_path / "gone.yaml"
        argv = ("workstation", "status", "--config", str(gone), "--state-dir", str(running.state))
        assert await relay(*argv) == 0
        assert f"pid {os.getpid()}" in capsys.readouterr().out


def test_state_dir_is_not_an_option_of_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["workstation", "--config", str(tmp_path / "ws.yaml"), "--state-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--state-dir is for reload|stop|status" in capsys.readouterr().err
