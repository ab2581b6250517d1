"""The DICOMweb server's admission (relay.ops.admission) on uvloop, the loop the
workstation runs on where it exists: `local_access` decides before a byte is read. Under
uvloop a pause_reading() in connection_made holds nothing, and another account's request
was answered (200, with its data) before the lookup's 403."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relay.workstation.dicomweb.server import LIMITS, MAX_CONNECTIONS
from tests.pki_helpers import LOOP_KINDS, LoopKind, run
from tests.workstation.dicomweb.test_server import scripted

WAIT = 10.0  # an upper bound on every wait; never an assertion on time


def test_the_cap_and_its_answer_are_unchanged() -> None:
    assert LIMITS.max_connections == MAX_CONNECTIONS == 128
    assert LIMITS.busy is not None and LIMITS.busy.startswith(b"HTTP/1.1 503 ")


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_another_accounts_request_is_not_answered_while_its_account_is_looked_up(
    kind: LoopKind,
) -> None:
    async def main() -> None:
        async with scripted() as (srv, _):
            assert srv.address is not None
            srv.accounts.access = "same-user"
            release = threading.Event()

            def slow_no(peer: tuple[str, int], local: tuple[str, int]) -> bool:
                release.wait(WAIT)  # the lookup takes its time...
                return False  # ...and says: another account

            srv.accounts._check = slow_no
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.address.port)
            writer.write(b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            for _ in range(50):  # the loop runs: it would read, parse and answer if it could
                await asyncio.sleep(0.005)
            release.set()
            async with asyncio.timeout(WAIT):
                try:
                    answer = await reader.read()
                except ConnectionResetError:
                    answer = b""
            writer.close()
            assert answer.startswith(b"HTTP/1.1 403 ") and answer.count(b"HTTP/1.1 ") == 1
            assert srv.accounts.refused == {"dicomweb": 1}

    run(kind, main())
