"""The hello on an agent link, against the real gateway in-process: each end sends the
"revoke" version the other takes, whatever the order in which a hospital upgrades them.

A current agent (its LinkTrust and DeviceAuthority on a real dialled link) sends version
1 first, then version 2 once the gateway answered its hello; an older agent's stand-in
(version 1 only, no hello) is served as before; a malformed hello or an enroll-result
label the gateway does not know never costs the agent link.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import pytest

from relay import wire
from relay.agent.audit import AuditLog
from relay.agent.linktrust import LinkTrust
from relay.net import tls
from relay.net.aio import Link
from relay.net.dialer import dial
from relay.ops.config import Address
from relay.proto import ErrorCode
from relay.trust.identity import Identity
from relay.trust.revocation import (
    KIND_ENROLL_RESULT,
    KIND_HELLO,
    KIND_REFUSAL,
    KIND_REVOKE,
    REVOKED_REASON,
    decode_hello,
    decode_revocations,
    encode_hello,
    goaway_reason,
)
from tests.agent.test_linktrust import authority_with_trail
from tests.gateway.test_gateway_links import (
    SETTINGS,
    WAIT,
    World,
    announce,
    connect,
    expect_refused,
    goaway_of,
    until,
    wait_for_agents,
    world,
)
from tests.pki_helpers import HOST

__all__ = ["world"]

UNSIGNED = "without signed notices"


def device(name: str) -> str:
    return Identity.device("hospital.test", "main", name).uri


def recorded(link: Link) -> list[tuple[str, bytes]]:
    """Every control `link` sends from now on, in order (then sent as usual)."""
    sent: list[tuple[str, bytes]] = []
    send = link.send_control

    def record(kind: str, body: bytes) -> None:
        sent.append((kind, body))
        send(kind, body)

    link.send_control = record  # type: ignore[method-assign]
    return sent


def heard(link: Link) -> list[tuple[str, bytes]]:
    """Every control `link` receives from now on, in order."""
    got: list[tuple[str, bytes]] = []
    link.on_control = lambda kind, body: got.append((kind, body))
    return got


async def test_a_current_agent_sends_version_1_then_2_and_the_gateway_ends_with_notices(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.control")
    audit = AuditLog(tmp_path / "audit.log", source_id="a", site="main")
    authority = authority_with_trail(world.pki, tmp_path / "state", audit)
    authority.registry.revoke("old", dt.datetime.now(dt.UTC))
    links: list[Link] = []
    trust = LinkTrust(authority, lambda: links)
    ctx = tls.client_context(
        world.pki.agent.cert, world.pki.agent.key, world.pki.ca, wire.ALPN_AGENT
    )
    link = await dial(
        Address(HOST, world.port), ctx, SETTINGS, alpn=wire.ALPN_AGENT, name="gw", timeout=WAIT
    )
    links.append(link)
    sent = recorded(link)
    trust.on_link_up(link)
    await wait_for_agents(world, "main")
    await until(lambda: world.server.revoked.notice(device("old")) != "")
    kinds = [kind for kind, _ in sent]
    assert kinds == [KIND_HELLO, KIND_REVOKE, KIND_REVOKE]
    lists = [decode_revocations(body) for _, body in sent[1:]]
    assert [(u.full, u.version) for u in lists] == [(True, 1), (True, 2)]
    _, said = await goaway_of(world, "old")
    notice = world.server.revoked.notice(device("old"))
    assert await asyncio.wait_for(said, WAIT) == (ErrorCode.REVOKED, goaway_reason(notice))

    trust.push(authority.revoke("ws1"))  # an increment, in version 2 on this link now
    await until(lambda: world.server.revoked.notice(device("ws1")) != "")
    assert decode_revocations(sent[-1][1]).version == 2
    assert not link.closed.done()
    assert not [r for r in caplog.records if UNSIGNED in r.getMessage()]  # not an old agent
    link.close()
    trust.close()
    authority.close()


async def test_an_older_agent_that_sends_version_1_only_is_served_as_before(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """No hello, no answer; its list routes the site, its increments close the device's
    links (with the plain words), and the gateway says once to upgrade the agent."""
    caplog.set_level(logging.WARNING, logger="gateway.control")
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    got = heard(agent)
    await wait_for_agents(world, "main")
    live, said = await goaway_of(world, "ws1")
    announce(agent, (device("ws1"),), full=False)
    assert await asyncio.wait_for(said, WAIT) == (ErrorCode.REVOKED, REVOKED_REASON)
    await expect_refused(
        world, "revoked", connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    )
    await until(lambda: any(kind == KIND_REFUSAL for kind, _ in got))  # after all before it
    assert [kind for kind, _ in got] == [KIND_REFUSAL]  # no hello to an agent that said none
    assert len([r for r in caplog.records if UNSIGNED in r.getMessage()]) == 1
    assert len(world.server.router.agent_links("main")) == 1
    live.close()
    agent.close()


async def test_the_gateway_answers_a_hello_once_and_ignores_what_it_does_not_know(
    world: World,
) -> None:
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT)
    got = heard(agent)
    agent.send_control(KIND_HELLO, b'{"v": 3, "revoke": [1, 2, 9], "later": {"x": 1}}')
    agent.send_control(KIND_HELLO, encode_hello())  # a second one gets no second answer
    agent.send_control("capabilities", b"\x00 a kind of a later agent")
    announce(agent)
    await wait_for_agents(world, "main")
    announce(agent, (device("ws1"),), full=False)
    await expect_refused(
        world, "revoked", connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    )
    await until(lambda: any(kind == KIND_REFUSAL for kind, _ in got))
    assert [kind for kind, _ in got] == [KIND_HELLO, KIND_REFUSAL]
    assert decode_hello(got[0][1]).revoke == {1, 2}
    agent.close()


def enrollments(world: World, result: str) -> float:
    value = world.server.metrics.registry.get_sample_value(
        "relay_enrollments_total", {"result": result}
    )
    return value or 0.0


async def test_a_bad_hello_or_an_unknown_enroll_result_keeps_the_agent_link(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A label is only a metric: one the gateway does not know (a newer agent's) is
    counted as `other`; a malformed hello is a lost upgrade. Neither closes the link."""
    caplog.set_level(logging.WARNING, logger="gateway.control")
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT)
    got = heard(agent)
    agent.send_control(KIND_HELLO, b"\xff not a hello")
    announce(agent)
    await wait_for_agents(world, "main")
    agent.send_control(KIND_ENROLL_RESULT, b'{"v":1,"result":"a_label_of_2030"}')
    agent.send_control(KIND_ENROLL_RESULT, b'{"v":1,"result":"ok"}')
    await until(lambda: enrollments(world, "ok") == 1)
    assert enrollments(world, "other") == 1
    assert enrollments(world, "a_label_of_2030") == 0
    assert not agent.closed.done()
    assert len(world.server.router.agent_links("main")) == 1
    assert got == []  # no answer to a malformed hello
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["agent sent a malformed hello; it gets no answer"]
    agent.close()
