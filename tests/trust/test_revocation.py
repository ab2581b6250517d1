"""The agent <-> gateway control messages: revoke (incremental and full), refusal, enroll-result."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import Connection, ControlReceived, LinkSettings
from relay.trust.revocation import (
    ENROLL_RESULTS,
    KIND_REFUSAL,
    KIND_REVOKE,
    MAX_BODY,
    Refusal,
    RevocationAssembler,
    RevocationError,
    RevocationList,
    RevocationUpdate,
    decode_enroll_result,
    decode_refusal,
    decode_revocations,
    encode_enroll_result,
    encode_refusal,
    encode_revocations,
)

TD = "hospital.test"


def dev(name: str, site: str = "main", td: str = TD) -> str:
    return f"spiffe://{td}/device/{site}/{name}"


def assemble(bodies: list[bytes]) -> list[RevocationUpdate]:
    assembler = RevocationAssembler()
    out = []
    for body in bodies:
        update = assembler.feed(decode_revocations(body))
        if update is not None:
            out.append(update)
    return out


def test_incremental_round_trip() -> None:
    (body,) = encode_revocations([dev("b"), dev("a"), dev("a")], full=False)
    update = decode_revocations(body)
    assert update == RevocationUpdate((dev("a"), dev("b")), full=False, part=0, parts=1)


def test_empty_full_list_is_one_message() -> None:
    (body,) = encode_revocations([], full=True)
    assert assemble([body]) == [RevocationUpdate((), True)]
    assert encode_revocations([], full=False) == []


def test_large_full_list_is_split_and_reassembled() -> None:
    devices = [dev(f"device-{i:05d}-" + "x" * 40) for i in range(2000)]
    bodies = encode_revocations(devices, full=True)
    assert len(bodies) > 5
    assert all(len(b) <= MAX_BODY for b in bodies)
    (whole,) = assemble(bodies)
    assert whole.full and sorted(whole.devices) == sorted(devices)


def test_every_body_fits_a_minimum_size_control_frame() -> None:
    """A snapshot goes out before the gateway's SETTINGS: it must fit the default frame."""
    devices = [dev(f"d{i}" + "y" * 60) for i in range(500)]
    sender = Connection(client=True, settings=LinkSettings(), now=0.0)
    receiver = Connection(client=False, settings=LinkSettings(), now=0.0)
    for body in encode_revocations(devices, full=True):
        sender.send_control(KIND_REVOKE, body)  # raises if larger than the peer's frame
    events = receiver.receive_data(sender.data_to_send(), 0.0)
    bodies = [e.body for e in events if isinstance(e, ControlReceived)]
    (whole,) = assemble(bodies)
    assert set(whole.devices) == set(devices)


def test_out_of_order_parts_are_refused() -> None:
    devices = [dev(f"device-{i:05d}-" + "x" * 40) for i in range(1000)]
    bodies = encode_revocations(devices, full=True)
    assembler = RevocationAssembler()
    assembler.feed(decode_revocations(bodies[0]))
    with pytest.raises(RevocationError, match="out of order"):
        assembler.feed(decode_revocations(bodies[2]))
    with pytest.raises(RevocationError, match="out of order"):  # must restart at part 0
        assembler.feed(decode_revocations(bodies[1]))


def _body(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "full": False, "part": 0, "parts": 1, "devices": []}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (_body(v=2), "version"),
        (_body(extra=1), "unexpected keys"),
        (_body(full="yes"), "true or false"),
        (_body(part=1, parts=1), "out of range"),
        (_body(part=0, parts=0), "out of range"),
        (_body(full=True, part=0, parts=5000), "out of range"),
        (_body(parts=2, part=0), "one part"),
        (_body(devices="x"), "must be a list"),
        (_body(devices=[1]), "must be strings"),
        (_body(devices=["spiffe://hospital.test/agent/main"]), "not a device"),
        (_body(devices=["https://x/device/main/a"]), "bad device id"),
        (_body(devices=[dev("a"), dev("a")]), "duplicate"),
        (b"x" * (MAX_BODY + 1), "larger than"),
        (_body(part=True), "integer"),
    ],
)
def test_decode_is_strict(body: bytes, message: str) -> None:
    with pytest.raises(RevocationError, match=message):
        decode_revocations(body)


@given(st.binary(max_size=400))
def test_decode_never_raises_anything_else(body: bytes) -> None:
    with contextlib.suppress(RevocationError):
        decode_revocations(body)


@settings(max_examples=50)
@given(st.sets(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True), max_size=300), st.booleans())
def test_round_trip_any_set(names: set[str], full: bool) -> None:
    devices = {dev(n) for n in names}
    bodies = encode_revocations(devices, full=full)
    got = set()
    for update in assemble(bodies):
        assert update.full == full
        got |= set(update.devices)
    assert got == devices


def test_list_applies_incremental_and_full() -> None:
    revoked = RevocationList(TD)
    assert not revoked.has_snapshot("main")
    assert revoked.apply("main", RevocationUpdate((dev("a"),), False)) == [dev("a")]
    assert revoked.apply("main", RevocationUpdate((dev("a"), dev("b")), False)) == [dev("b")]
    assert dev("a") in revoked and revoked.is_revoked(dev("b")) and len(revoked) == 2
    # A snapshot replaces the site's set: "a" was let back in by the agent.
    assert revoked.apply("main", RevocationUpdate((dev("b"), dev("c")), True)) == [dev("c")]
    assert not revoked.is_revoked(dev("a")) and revoked.has_snapshot("main")
    assert revoked.devices("main") == {dev("b"), dev("c")}
    assert not revoked.is_revoked("garbage") and not revoked.is_revoked(None)


def test_an_agent_speaks_only_for_its_site_and_domain() -> None:
    revoked = RevocationList(TD)
    revoked.apply("other", RevocationUpdate((dev("x", "other"),), True))
    with pytest.raises(RevocationError, match="may not revoke"):
        revoked.apply("main", RevocationUpdate((dev("a"), dev("x", "other")), False))
    with pytest.raises(RevocationError, match="may not revoke"):
        revoked.apply("main", RevocationUpdate((dev("a", td="evil.test"),), True))
    assert not revoked.is_revoked(dev("a"))  # nothing of a refused update applied
    # A full list from "main" leaves the other site's set alone.
    revoked.apply("main", RevocationUpdate((), True))
    assert revoked.is_revoked(dev("x", "other"))


def test_refusal_round_trip_and_validation() -> None:
    refusal = Refusal("revoked", dev("a"), "203.0.113.9:50122", suppressed=3)
    assert decode_refusal(encode_refusal(refusal)) == refusal
    assert decode_refusal(encode_refusal(Refusal("unknown_ca", "", "::1:5000"))).peer == "::1:5000"
    for kwargs in (
        {"reason": "Bad Reason"},
        {"reason": "x" * 33},
        {"reason": "ok", "identity": "not-a-uri"},
        {"reason": "ok", "peer": "a b"},
        {"reason": "ok", "peer": "x" * 65},
        {"reason": "ok", "suppressed": -1},
    ):
        with pytest.raises(RevocationError):
            Refusal(**kwargs)
    with pytest.raises(RevocationError, match="unexpected keys"):
        decode_refusal(b'{"v":1,"reason":"x","identity":"","peer":"","suppressed":0,"body":"x"}')
    with pytest.raises(RevocationError, match="strings"):
        decode_refusal(b'{"v":1,"reason":1,"identity":"","peer":"","suppressed":0}')
    assert KIND_REFUSAL == "refusal"


def test_enroll_result_round_trip() -> None:
    for result in ENROLL_RESULTS:
        assert decode_enroll_result(encode_enroll_result(result)) == result
    with pytest.raises(RevocationError):
        encode_enroll_result("made_up")
    with pytest.raises(RevocationError):
        decode_enroll_result(b'{"v":1,"result":"made_up"}')


def test_module_imports_nothing_the_gateway_must_not_load() -> None:
    code = (
        "import sys, relay.trust.revocation; "
        "bad = [m for m in ('pydicom', 'pynetdicom', 'zstandard', 'sqlite3', 'relay.agent') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
