"""A minimal LDAP server speaking real LDAP (BER over plain TCP on 127.0.0.1), for the
result codes a real slapd cannot be made to give a user's bind: busy (51),
unavailable (52), unwillingToPerform (53), other (80), or Active Directory's 49 with
"data 775" in its diagnostic message; and searches cut short by the server's own size
limit (4).

It knows one service account (SERVICE_DN, any password) and one user (USER_DN, found
by any search under PEOPLE, as many times and with the result code `user_search`
says). The user's bind is answered with `user_bind` (result code, diagnostic message);
a membership search (base GROUP) finds the user; any other search finds nothing. Plain
LDAP: the settings it gives say `insecure_plaintext`.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Final

from relay.agent.directory import DirectorySettings
from tests.pki_helpers import HOST

SERVICE_DN: Final = "cn=svc,dc=h"
PEOPLE: Final = "ou=people,dc=h"
USER_DN: Final = f"uid=alice,{PEOPLE}"
GROUP: Final = "cn=users,dc=h"
ADMIN_GROUP: Final = "cn=admins,dc=h"
#: Largest LDAP message it reads; a bigger one closes the connection.
MAX_MESSAGE: Final = 64 * 1024

_BIND: Final = 0x60
_BIND_RESPONSE: Final = 0x61
_UNBIND: Final = 0x42
_SEARCH: Final = 0x63
_SEARCH_ENTRY: Final = 0x64
_SEARCH_DONE: Final = 0x65


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def _message(message_id: int, op: bytes) -> bytes:
    return _tlv(
        0x30,
        _tlv(0x02, message_id.to_bytes(max(1, (message_id.bit_length() + 8) // 8), "big")) + op,
    )


def _result(tag: int, code: int, text: str = "") -> bytes:
    return _tlv(tag, _tlv(0x0A, bytes([code])) + _tlv(0x04, b"") + _tlv(0x04, text.encode()))


def _read_tlv(data: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at `i`."""
    tag, n, j = data[i], data[i + 1], i + 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(data[j : j + k], "big")
        j += k
    return tag, j, j + n


class FakeLdap:
    """`user_binds`: how many binds as the user it answered; `bound`: the DNs of those."""

    def __init__(self, code: int, message: str = "") -> None:
        self.user_bind = (code, message)
        self.user_binds = 0
        self.bound: list[str] = []
        #: How a search under PEOPLE is answered: (entries, result code).
        self.user_search = (1, 0)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeLdap:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def settings(self, **overrides: Any) -> DirectorySettings:
        settings = DirectorySettings(
            host=HOST, port=self.port, use_ssl=False, start_tls=False, ca=None,
            bind_dn=SERVICE_DN, bind_password="pw", user_base=PEOPLE,
            user_filter="(uid={user})", group=GROUP, admin_group=ADMIN_GROUP, timeout=3,
            insecure_plaintext=True,
        )  # fmt: skip
        return replace(settings, **overrides)

    def _answer(self, message_id: int, body: bytes, op_start: int) -> bytes:
        op, start, _ = _read_tlv(body, op_start)
        if op == _BIND:  # version, name, authentication
            _, _, version_end = _read_tlv(body, start)
            _, name_start, name_end = _read_tlv(body, version_end)
            if body[name_start:name_end].decode() == SERVICE_DN:
                return _message(message_id, _result(_BIND_RESPONSE, 0))
            self.user_binds += 1
            self.bound.append(body[name_start:name_end].decode())
            code, text = self.user_bind
            return _message(message_id, _result(_BIND_RESPONSE, code, text))
        if op == _SEARCH:  # the base object first
            _, base_start, base_end = _read_tlv(body, start)
            base = body[base_start:base_end].decode()
            entries, code = self.user_search if base == PEOPLE else (1, 0)
            found = b""
            if base in (PEOPLE, GROUP, ADMIN_GROUP):
                dn = USER_DN if base == PEOPLE else base
                found = entries * _message(
                    message_id, _tlv(_SEARCH_ENTRY, _tlv(0x04, dn.encode()) + _tlv(0x30, b""))
                )
            return found + _message(message_id, _result(_SEARCH_DONE, code))
        return b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                while len(buffer) >= 2:
                    _, start, end = _read_tlv(buffer, 0)
                    if end > MAX_MESSAGE:
                        return
                    if len(buffer) < end:
                        break
                    body, buffer = buffer[start:end], buffer[end:]
                    _, id_start, id_end = _read_tlv(body, 0)
                    if body[id_end] == _UNBIND:
                        return
                    writer.write(
                        self._answer(int.from_bytes(body[id_start:id_end], "big"), body, id_end)
                    )
                    await writer.drain()
        except (ConnectionError, IndexError):
            return
        finally:
            writer.close()
