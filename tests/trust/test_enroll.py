"""`relay enroll` against real TLS on 127.0.0.1: a stand-in gateway, then the real one.

The stand-in accepts the enrollment ALPN with relay.net.tls.server_context + accept_tls,
runs a Link and hands the `enroll` stream to the agent's serve_enroll_stream, the way
the gateway routes it to an agent. The last tests go through the real gateway and an
agent link, so the wiring is checked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import io
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from relay import wire
from relay.agent.audit import AUDIT_FILE, AuditLog, read_events
from relay.agent.enrollment import EnrollOutcome, serve_enroll_stream
from relay.agent.registry import REGISTRY_FILE, DeviceRegistry
from relay.agent.sessions import SessionServer
from relay.agent.signer import Signer
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream
from relay.net.dialer import dial
from relay.ops import privatefiles
from relay.ops.config import Address
from relay.ops.secretinput import SecretReader
from relay.proto import ErrorCode, LinkSettings
from relay.seal.policy import enroll_server_context, session_server_context
from relay.trust import enroll as enroll_module
from relay.trust import pki
from relay.trust.codes import EnrollmentCode, new_secret, new_token_id
from relay.trust.enroll import (
    PINNED_CA_MISMATCH,
    EnrollError,
    enroll,
    read_password,
    run_enroll,
)
from relay.trust.identity import Identity, identity_from_certificate
from relay.trust.renewal import complete_pending_renewal
from relay.trust.revocation import KIND_REVOKE, encode_revocations
from tests.ends_helpers import running_gateway
from tests.pki_helpers import HOST, SitePki, make_pki

WAIT = 10.0


def utcnow() -> datetime:
    return datetime.now(dt.UTC)


@dataclass
class StandIn:
    """A one-site 'gateway + agent' in one process, for the PC side."""

    site: SitePki
    registry: DeviceRegistry
    audit: AuditLog
    gateway_cert: Path
    gateway_key: Path
    clock: Callable[[], datetime] = utcnow
    mode: str = "serve"  # serve | no_route | close_after_handshake
    port: int = 0
    outcomes: list[EnrollOutcome] = field(default_factory=list)
    device_identities: list[Identity] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _sock: socket.socket | None = None

    async def start(self) -> None:
        self._sock = socket.create_server((HOST, 0))
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = tls.server_context(self.gateway_cert, self.gateway_key, self.site.ca)
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            self._spawn(self._handle(conn, ctx))

    async def _handle(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        with contextlib.suppress(Exception):
            transport, link = await tls.accept_tls(
                conn,
                ctx,
                lambda: Link(client=False, settings=LinkSettings(), autostart=False),
                handshake_timeout=5.0,
            )
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol()
            if alpn == wire.ALPN_DEVICE:  # "the workstation starts with the new identity"
                identity = tls.peer_identity(ssl_object)
                assert identity is not None
                self.device_identities.append(identity)
                transport.close()
                return
            if alpn != wire.ALPN_ENROLL or self.mode == "close_after_handshake":
                transport.abort()
                return
            link.on_stream = self._on_stream
            link.start()
            await link.wait_closed()

    def _on_stream(self, stream: Stream) -> None:
        if self.mode == "no_route":
            stream.reset(ErrorCode.NO_ROUTE)
            return
        # What the agent does with an `enroll` stream: the CA in the clear, then TLS.
        agent = self.site.agent
        SessionServer(
            site="main",
            trust_domain=self.site.trust_domain,
            session_ctx=session_server_context(agent.cert, agent.key, self.site.ca),
            enroll_ctx=enroll_server_context(agent.cert, agent.key),
            settings=LinkSettings(),
            dispatch=lambda inner: inner.reset(ErrorCode.FORBIDDEN),
            serve_enroll=self._serve,
            ca_pem=self.site.ca.read_text(),
        ).on_stream(stream)

    async def _serve(self, stream: ByteStream) -> None:
        outcome = await serve_enroll_stream(
            stream,
            Signer(
                self.registry,
                self.site.ca_key,
                self.site.ca_cert,
                "main",
                timedelta(days=30),
                self.audit,
                self.clock,
            ),
        )
        self.outcomes.append(outcome)

    def code(
        self,
        device: str = "ws1",
        ttl: timedelta = timedelta(hours=1),
        *,
        host: str = HOST,
        fingerprint: str | None = None,
        secret: bytes | None = None,
    ) -> str:
        token_id, real_secret = self.registry.create_token(device, ttl, self.clock())
        return EnrollmentCode(
            Address(host, self.port),
            fingerprint or pki.ca_fingerprint(self.site.ca_cert),
            "main",
            device,
            token_id,
            secret or real_secret,
        ).encode()


@contextlib.asynccontextmanager
async def stand_in(
    tmp: Path, site: SitePki | None = None, gateway_from: SitePki | None = None, **kw: Any
) -> AsyncIterator[StandIn]:
    site = site or make_pki(tmp / "pki")
    gw = gateway_from or site
    with DeviceRegistry(tmp / REGISTRY_FILE, site="main") as registry:
        server = StandIn(
            site,
            registry,
            AuditLog(tmp / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main"),
            gw.gateway.cert,
            gw.gateway.key,
            **kw,
        )
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


async def test_enroll_writes_a_working_identity(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        out = tmp_path / "identity"
        cert_path = await enroll(server.code(), out, timeout=WAIT)
        assert cert_path == out / "device.crt"
        privatefiles.check_private(out, "identity directory")  # 0700, or a user-only ACL
        privatefiles.check_private(out / "device.key")  # 0600, or a user-only ACL
        cert = pki.load_cert(out / "device.crt")
        ca = pki.load_cert(out / "ca.crt")
        assert pki.ca_fingerprint(ca) == pki.ca_fingerprint(server.site.ca_cert)
        cert.verify_directly_issued_by(ca)
        assert identity_from_certificate(cert).uri == "spiffe://hospital.test/device/main/ws1"
        key = pki.load_key(out / "device.key")
        assert key.public_key() == cert.public_key()
        # The new identity authenticates a device link (what `relay workstation` does).
        ctx = tls.client_context(out / "device.crt", out / "device.key", out / "ca.crt")
        reader, writer = await asyncio.open_connection(
            HOST, server.port, ssl=ctx, server_hostname=HOST
        )
        await reader.read()
        writer.close()
        assert [i.uri for i in server.device_identities] == [identity_from_certificate(cert).uri]
        assert [o.result for o in server.outcomes] == ["ok"]
        row = server.registry.get_device("ws1")
        assert row is not None and row.serial == format(cert.serial_number, "x")


async def expect_error(code: str, out: Path, text: str, **kwargs: Any) -> str:
    with pytest.raises(EnrollError) as info:
        await enroll(code, out, timeout=WAIT, **kwargs)
    message = str(info.value)
    assert text in message, message
    assert "\n" not in message and len(message) < 400
    assert not (out / "device.key").exists()
    return message


async def test_reused_code(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        code = server.code()
        await enroll(code, tmp_path / "first", timeout=WAIT)
        await expect_error(code, tmp_path / "second", "already used")
        assert server.outcomes[-1].result == "reused"
        event = read_events(server.audit.path)[-1]
        assert event["EventIdentification"]["EventOutcomeIndicator"] == 4


async def test_expired_code(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        code = server.code(ttl=timedelta(minutes=5))
        server.clock = lambda: utcnow() + timedelta(minutes=6)
        await expect_error(code, tmp_path / "out", "expired at")


async def test_forged_code(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        await expect_error(server.code(secret=new_secret()), tmp_path / "out", "not valid")
        assert server.outcomes[-1].result == "forged"


async def test_code_for_another_device_name(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        await expect_error(
            server.code("ws1"), tmp_path / "out", "issued for device 'ws1', not 'ws2'", device="ws2"
        )


async def test_gateway_certificate_not_from_the_pinned_ca(tmp_path: Path) -> None:
    """An impostor gateway (another CA) in front of the real agent: no secret leaves."""
    impostor = make_pki(tmp_path / "impostor", trust_domain="hospital.test")
    async with stand_in(tmp_path, gateway_from=impostor) as server:
        code = server.code()
        message = await expect_error(code, tmp_path / "out", PINNED_CA_MISMATCH)
        assert message == PINNED_CA_MISMATCH
        await asyncio.sleep(0)
        assert all(o.result != "ok" for o in server.outcomes)
    # The secret never reached the agent: the code is still good.
    with DeviceRegistry(tmp_path / REGISTRY_FILE, site="main") as registry:
        rows = registry._db.execute("SELECT used_at FROM tokens").fetchall()
        assert rows == [(None,)]


async def test_site_ca_not_the_pinned_one(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        code = server.code(fingerprint="00" * 32)
        message = await expect_error(code, tmp_path / "out", PINNED_CA_MISMATCH)
        assert "the code pins 0000000000000000" in message


async def test_gateway_certificate_for_another_name(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki", gateway_names=("localhost",))  # no 127.0.0.1 SAN
    async with stand_in(tmp_path, site=site) as server:
        await expect_error(server.code(), tmp_path / "out", f"not valid for {HOST}")


async def test_no_route_to_the_site(tmp_path: Path) -> None:
    async with stand_in(tmp_path, mode="no_route") as server:
        await expect_error(server.code(), tmp_path / "out", "no link to the agent of site 'main'")


async def test_gateway_closing_at_once(tmp_path: Path) -> None:
    async with stand_in(tmp_path, mode="close_after_handshake") as server:
        await expect_error(server.code(), tmp_path / "out", "closed the connection")


async def test_nothing_listening(tmp_path: Path) -> None:
    async with stand_in(tmp_path) as server:
        code = server.code()
    await expect_error(code, tmp_path / "out", "cannot reach the gateway")


async def test_unwritable_directory_fails_before_spending_the_code(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    async with stand_in(tmp_path) as server:
        await expect_error(server.code(), blocker / "out", "cannot write to")
        assert server.outcomes == []


async def test_bad_code(tmp_path: Path) -> None:
    await expect_error("DMZR1-AAAA", tmp_path / "out", "incomplete")


def test_run_enroll_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_enroll("nonsense", tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("relay enroll: ")


# --- --force replaces the identity as a set -------------------------------------------


def identity_files(directory: Path) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in ("device.crt", "device.key", "ca.crt")}


async def test_force_interrupted_while_writing_keeps_the_identity_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new certificate cannot be written (disk full): the identity already there is
    kept whole (not the new key beside the old certificate), and nothing is left over."""
    async with stand_in(tmp_path) as server:
        out = tmp_path / "identity"
        await enroll(server.code(), out, timeout=WAIT)
        before = identity_files(out)
        write_cert = pki.write_cert

        def disk_full(path: Path, cert: Any, **kwargs: Any) -> None:
            if "device.crt" in Path(path).name:
                raise pki.PkiError(f"cannot write {path}: No space left on device")
            write_cert(path, cert, **kwargs)

        monkeypatch.setattr(pki, "write_cert", disk_full)
        with pytest.raises(EnrollError, match="No space left on device"):
            await enroll(server.code(), out, timeout=WAIT, force=True)
        monkeypatch.undo()
        assert complete_pending_renewal(out) in (None, "discarded")  # the next start
        assert identity_files(out) == before
        assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "device.crt", "device.key"]
        tls.client_context(out / "device.crt", out / "device.key", out / "ca.crt")


async def test_force_interrupted_between_renames_is_completed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enrolling at another site with --force, stopped after the new key (and CA) were
    renamed into place but before the certificate: the code is spent, and the next start
    puts the new certificate beside them, never a mixed identity."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "identity"
    async with stand_in(tmp_path / "a") as first:
        await enroll(first.code(), out, timeout=WAIT)
    replace = os.replace

    def interrupted(src: Any, dst: Any) -> None:
        if Path(dst).name == "device.crt":
            raise OSError(errno.EIO, "interrupted")
        replace(src, dst)

    async with stand_in(tmp_path / "b") as second:
        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(EnrollError):
            await enroll(second.code(), out, timeout=WAIT, force=True)
        monkeypatch.undo()
        assert [o.result for o in second.outcomes] == ["ok"]
        assert complete_pending_renewal(out) == "completed"  # what the next start does
        cert = pki.load_cert(out / "device.crt")
        assert pki.load_key(out / "device.key").public_key() == cert.public_key()
        assert pki.load_cert(out / "ca.crt") == second.site.ca_cert
        cert.verify_directly_issued_by(second.site.ca_cert)
        row = second.registry.get_device("ws1")
        assert row is not None and row.serial == format(cert.serial_number, "x")
        tls.client_context(out / "device.crt", out / "device.key", out / "ca.crt")


# --- through the real gateway -----------------------------------------------------------


@contextlib.asynccontextmanager
async def agent_link(site: SitePki, port: int, on_stream: Callable[[Stream], None]) -> Any:
    ctx = tls.client_context(site.agent.cert, site.agent.key, site.ca, wire.ALPN_AGENT)
    link = await dial(
        Address(HOST, port),
        ctx,
        LinkSettings(),
        alpn=wire.ALPN_AGENT,
        name="agent",
        timeout=WAIT,
        on_stream=on_stream,
    )
    for body in encode_revocations((), full=True):  # as a real agent does on link-up
        link.send_control(KIND_REVOKE, body)
    try:
        yield link
    finally:
        link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.wait_closed(), WAIT)


async def wait_for_task(tasks: list[asyncio.Task[EnrollOutcome]]) -> None:
    async with asyncio.timeout(WAIT):
        while not tasks:  # noqa: ASYNC110 - the agent's task is created on its own loop turn
            await asyncio.sleep(0.01)


async def test_enroll_through_the_real_gateway(tmp_path: Path) -> None:
    site = make_pki(tmp_path / "pki")
    async with running_gateway(site, tmp_path) as gateway:
        with DeviceRegistry(tmp_path / REGISTRY_FILE, site="main") as registry:
            audit = AuditLog(tmp_path / AUDIT_FILE, source_id="agent")
            tasks: list[asyncio.Task[EnrollOutcome]] = []
            seen_headers: list[dict[str, str]] = []

            async def serve(stream: ByteStream) -> None:
                seen_headers.append(dict(stream.headers))
                signer = Signer(
                    registry, site.ca_key, site.ca_cert, "main", timedelta(days=30), audit, utcnow
                )
                tasks.append(asyncio.ensure_future(serve_enroll_stream(stream, signer)))
                await tasks[-1]

            agent = site.agent
            on_stream = SessionServer(
                site="main",
                trust_domain=site.trust_domain,
                session_ctx=session_server_context(agent.cert, agent.key, site.ca),
                enroll_ctx=enroll_server_context(agent.cert, agent.key),
                settings=LinkSettings(),
                dispatch=lambda inner: inner.reset(ErrorCode.FORBIDDEN),
                serve_enroll=serve,
                ca_pem=site.ca.read_text(),
            ).on_stream

            token_id, secret = registry.create_token("ws1", timedelta(hours=1), utcnow())
            code = EnrollmentCode(
                Address(HOST, gateway.port),
                pki.ca_fingerprint(site.ca_cert),
                "main",
                "ws1",
                token_id,
                secret,
            ).encode()
            # No agent linked yet: the gateway has no route for the site.
            await expect_error(code, tmp_path / "early", "no link to the agent")
            async with agent_link(site, gateway.port, on_stream):
                for _ in range(500):
                    if gateway.server.router.sites() == ["main"]:
                        break
                    await asyncio.sleep(0.01)
                cert_path = await enroll(code, tmp_path / "out", timeout=WAIT)
                await wait_for_task(tasks)
                outcome = await asyncio.wait_for(tasks[0], WAIT)
            assert outcome.ok
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            assert identity_from_certificate(cert).name == "ws1"
            assert seen_headers[0]["x-relay-peer"] == HOST  # the gateway vouches for it
            assert seen_headers[0]["target"] == "enroll"
            (event,) = read_events(audit.path)
            assert event["ActiveParticipant"][0]["NetworkAccessPointID"] == HOST


# --- a password or a code from a Windows file or pipe ---------------------------------


def user_code(port: int = 9) -> str:
    return EnrollmentCode(
        Address(HOST, port), "ab" * 32, "main", "ws1", new_token_id(), new_secret(), user="alice"
    ).encode()


@pytest.mark.parametrize(
    ("data", "password"),
    [
        (b"S3cret!\n", "S3cret!"),
        ("\ufeffS3cret!\r\n".encode(), "S3cret!"),  # PowerShell 5.1 Out-File -Encoding utf8
        ("\ufeffS3cret!\r\n".encode("utf-16-le"), "S3cret!"),  # PowerShell 5.1 `>`
        ("\ufeffPassw\u00f6rt1\r\n".encode("utf-16-be"), "Passw\u00f6rt1"),
        ("Passw\u00f6rt1".encode(), "Passw\u00f6rt1"),  # no newline at all
        (b" two  spaces \r\nsecond line\n", " two  spaces "),  # only the newline goes
    ],
)
def test_a_password_file_from_any_windows_tool_reads_as_typed(
    tmp_path: Path, data: bytes, password: str
) -> None:
    path = tmp_path / "pw.txt"
    path.write_bytes(data)
    assert read_password("alice", password_file=path) == password


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("Passw\u00f6rt1\r\n".encode("cp1252"), "is not UTF-8 or UTF-16 text"),  # Notepad ANSI
        ("\ufeff\ufeffS3cret!\n".encode(), "contains U+FEFF"),  # a BOM that is not the mark
        (b"S3cret!\r\r\n", "contains U+000D"),
        (b"S3\tcret!\n", "contains U+0009"),
        (b"S3cret!\x00\n", "contains U+0000"),
        ("S3cret\ufffd\n".encode(), "contains U+FFFD"),  # garbled on its way into the file
    ],
)
def test_a_password_that_cannot_be_what_was_typed_is_refused_before_dialling(
    tmp_path: Path, data: bytes, error: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each wrong try spends one of the code's attempts and a directory bad-password count."""
    path = tmp_path / "pw.txt"
    path.write_bytes(data)
    with pytest.raises(EnrollError, match=re.escape(error)):
        read_password("alice", password_file=path)

    async def dialled(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("dialled with a garbled password")

    monkeypatch.setattr(enroll_module, "enroll", dialled)
    assert run_enroll(user_code(), tmp_path / "out", password_file=path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("relay enroll: ") and error in err


def test_the_password_on_stdin_is_decoded_from_its_bytes() -> None:
    """Windows: text-mode stdin decodes with the ANSI code page (cp1252): 'PasswÃ¶rt1'."""
    stdin = SecretReader(io.BytesIO("CODE\r\nPassw\u00f6rt1\r\n".encode()))
    assert stdin.readline(100) == "CODE\r\n"
    assert read_password("alice", stdin=stdin) == "Passw\u00f6rt1"
    utf16 = SecretReader(io.BytesIO("\ufeffCODE\r\nPassw\u00f6rt1\r\n".encode("utf-16-le")))
    assert utf16.readline(100).strip() == "CODE"
    assert read_password("alice", stdin=utf16) == "Passw\u00f6rt1"
    with pytest.raises(EnrollError, match="not UTF-8 or UTF-16"):
        read_password("alice", stdin=SecretReader(io.BytesIO(b"Passw\xf6rt1\r\n")))


async def test_a_code_with_a_byte_order_mark_is_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    async def dialled(code: str, *args: Any, **kwargs: Any) -> Path:
        seen.append(code)
        raise EnrollError("stop here")

    monkeypatch.setattr(enroll_module, "enroll", dialled)
    code = EnrollmentCode(
        Address(HOST, 9), "ab" * 32, "main", "ws1", new_token_id(), new_secret()
    ).encode()
    assert await asyncio.to_thread(run_enroll, "\ufeff" + code + "\r\n", tmp_path / "out") == 2
    assert seen == [code]
