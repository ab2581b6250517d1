"""The agent <-> gateway control messages: revoke (incremental and full), refusal,
enroll-result, hello."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import Connection, ControlReceived, LinkSettings
from relay.trust.revocation import (
    ENROLL_RESULT_OTHER,
    ENROLL_RESULTS,
    KIND_REFUSAL,
    KIND_REVOKE,
    MAX_BODY,
    MAX_HELLO,
    MAX_NOTICE,
    REVOKED_REASON,
    Refusal,
    RevocationAssembler,
    RevocationError,
    RevocationList,
    RevocationUpdate,
    decode_enroll_result,
    decode_hello,
    decode_refusal,
    decode_revocations,
    encode_enroll_result,
    encode_hello,
    encode_refusal,
    encode_revocations,
    enroll_result_label,
    goaway_reason,
    increment_without_notices,
    notice_in_reason,
)

TD = "hospital.test"
#: The form of a notice (relay.trust.notice); the gateway treats it as opaque text.
NOTICE = "rn1.AAAAAGsWQwA." + "s" * 86


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
        (_body(v=3), "version"),
        (_body(v=True), "version"),
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


# --- version 2: a signed notice per device -------------------------------------------


def notices_for(devices: list[str] | set[str]) -> dict[str, str]:
    return {d: NOTICE[:-8] + f"{i:08d}" for i, d in enumerate(sorted(devices))}


def test_v2_round_trip_carries_each_notice() -> None:
    devices = [dev("b"), dev("a")]
    notices = notices_for(devices)
    (body,) = encode_revocations(devices, full=False, notices=notices)
    update = decode_revocations(body)
    assert update.version == 2 and update.devices == (dev("a"), dev("b"))
    assert update.notices == (notices[dev("a")], notices[dev("b")])
    assert json.loads(body)["devices"][0] == [dev("a"), notices[dev("a")]]


def test_v2_snapshot_is_split_within_the_part_limit_and_reassembled() -> None:
    devices = [dev(f"device-{i:05d}-" + "x" * 40) for i in range(2000)]
    notices = notices_for(devices)
    bodies = encode_revocations(devices, full=True, notices=notices)
    assert len(bodies) > 10 and all(len(b) <= MAX_BODY for b in bodies)
    (whole,) = assemble(bodies)
    assert dict(zip(whole.devices, whole.notices, strict=True)) == notices


def test_the_largest_v2_list_fits_the_part_limit() -> None:
    """MAX_REVOKED devices with the longest names still make at most MAX_PARTS parts."""
    name = "n" * 64
    devices = [dev(f"{i:06d}{name[6:]}", "s" * 30) for i in range(100_000)]
    bodies = encode_revocations(devices, full=True, notices=notices_for(devices))
    assert len(bodies) <= 4096


def test_every_device_needs_a_notice_in_v2() -> None:
    with pytest.raises(RevocationError, match="no revocation notice"):
        encode_revocations([dev("a"), dev("b")], full=True, notices={dev("a"): NOTICE})
    with pytest.raises(RevocationError, match="notice must be"):
        encode_revocations([dev("a")], full=True, notices={dev("a"): "has space"})


def _v2(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 2, "full": False, "part": 0, "parts": 1, "devices": []}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_v2(devices=[dev("a")]), r"\[id, notice\] pair"),
        (_v2(devices=[[dev("a")]]), r"\[id, notice\] pair"),
        (_v2(devices=[[dev("a"), NOTICE, "x"]]), r"\[id, notice\] pair"),
        (_v2(devices=[[dev("a"), ""]]), "notice must be"),
        (_v2(devices=[[dev("a"), 7]]), "notice must be"),
        (_v2(devices=[[dev("a"), "x" * (MAX_NOTICE + 1)]]), "notice must be"),
        (_v2(devices=[[dev("a"), "rn1.a b"]]), "notice must be"),
        (_v2(devices=[[dev("a"), "rn1.\u00e9"]]), "notice must be"),
        (_v2(devices=[[7, NOTICE]]), "must be strings"),
        (_v2(devices=[[dev("a"), NOTICE], [dev("a"), NOTICE]]), "duplicate"),
        (_v2(devices={dev("a"): NOTICE}), "must be a list"),
    ],
)
def test_v2_decode_is_strict(body: bytes, message: str) -> None:
    with pytest.raises(RevocationError, match=message):
        decode_revocations(body)


_ENTRY = st.one_of(
    st.lists(st.one_of(st.text(max_size=140), st.integers(), st.none()), max_size=3),
    st.text(max_size=40),
    st.integers(),
)


@given(st.lists(_ENTRY, max_size=5), st.integers(-2, 4), st.booleans())
def test_v2_decode_never_raises_anything_else(devices: list[object], v: int, full: bool) -> None:
    with contextlib.suppress(RevocationError):
        update = decode_revocations(_v2(v=v, full=full, devices=devices))
        assert len(update.notices) == (len(update.devices) if v == 2 else 0)


@settings(max_examples=50)
@given(st.sets(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True), max_size=300), st.booleans())
def test_v2_round_trip_any_set(names: set[str], full: bool) -> None:
    devices = {dev(n) for n in names}
    notices = notices_for(devices)
    got: dict[str, str] = {}
    for update in assemble(encode_revocations(devices, full=full, notices=notices)):
        assert update.full == full and update.version == 2
        got.update(zip(update.devices, update.notices, strict=True))
    assert got == notices


def test_a_snapshot_does_not_mix_versions() -> None:
    devices = [dev(f"device-{i:05d}-" + "x" * 40) for i in range(1000)]
    v2 = encode_revocations(devices, full=True, notices=notices_for(devices))
    v1 = encode_revocations(devices, full=True)
    assembler = RevocationAssembler()
    assembler.feed(decode_revocations(v2[0]))
    with pytest.raises(RevocationError, match="out of order"):
        assembler.feed(decode_revocations(v1[1]))


def test_the_list_keeps_each_notice_beside_its_device() -> None:
    revoked = RevocationList(TD)
    a, b = NOTICE[:-1] + "a", NOTICE[:-1] + "b"
    revoked.apply("main", RevocationUpdate((dev("a"), dev("b")), True, notices=(a, b), version=2))
    assert revoked.notice(dev("a")) == a and revoked.notice(dev("b")) == b
    assert revoked.notice(dev("c")) == "" and revoked.notice("garbage") == ""
    # An older agent's increment (no notice) keeps the notice held; a new one replaces it.
    assert revoked.apply("main", RevocationUpdate((dev("a"), dev("c")), False)) == [dev("c")]
    assert revoked.notice(dev("a")) == a and revoked.notice(dev("c")) == ""
    new = NOTICE[:-1] + "n"
    assert revoked.apply("main", RevocationUpdate((dev("c"),), False, notices=(new,))) == []
    assert revoked.notice(dev("c")) == new
    # A snapshot replaces the site's set; one without notices (version 1: a current
    # agent's first list on a new link, before its version 2) keeps those held.
    revoked.apply("main", RevocationUpdate((dev("a"),), True))
    assert revoked.notice(dev("a")) == a and not revoked.is_revoked(dev("b"))
    assert not revoked.is_revoked(dev("c"))
    revoked.apply("main", RevocationUpdate((dev("a"),), True, notices=(new,), version=2))
    assert revoked.notice(dev("a")) == new
    with pytest.raises(RevocationError, match="one notice per device"):
        revoked.apply("main", RevocationUpdate((dev("a"), dev("b")), True, notices=(a,)))


def test_a_gateway_holds_a_notice_in_bounded_memory() -> None:
    """The per-entry cost MAX_REVOKED's comment states (measured as a gateway builds it)."""
    count = 5000
    devices = [f"spiffe://{TD}/device/main/radiology-pc-{i:06d}" for i in range(count)]
    bodies = encode_revocations(devices, full=True, notices=notices_for(devices))
    del devices
    gc.collect()
    tracemalloc.start()
    try:
        revoked, assembler = RevocationList(TD), RevocationAssembler()
        for body in bodies:
            update = assembler.feed(decode_revocations(body))
            if update is not None:
                revoked.apply("main", update)
        del update
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(revoked) == count
    assert held / count < 400


def test_the_goaway_reason_carries_the_notice_within_the_frame_limit() -> None:
    longest = "x" * MAX_NOTICE
    assert len(goaway_reason(longest).encode()) <= 256  # relay/proto MAX_GOAWAY_REASON
    assert notice_in_reason(goaway_reason(NOTICE)) == NOTICE
    assert goaway_reason("") == REVOKED_REASON
    assert notice_in_reason(REVOKED_REASON) is None  # an older gateway or agent: no notice
    assert notice_in_reason("session refused by the agent: revoked") is None
    assert notice_in_reason(f"something else {NOTICE}") is None
    assert notice_in_reason(f"{REVOKED_REASON} {NOTICE} ") is None


@given(st.text(max_size=300))
def test_notice_in_reason_takes_any_text(reason: str) -> None:
    notice = notice_in_reason(reason)
    assert notice is None or goaway_reason(notice) == reason


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


def test_a_gateway_counts_a_label_it_does_not_know_as_other() -> None:
    """A newer agent's label is a metric the gateway cannot name, not a broken peer."""
    assert enroll_result_label(encode_enroll_result("burnt")) == "burnt"
    assert enroll_result_label(b'{"v":1,"result":"made_up"}') == ENROLL_RESULT_OTHER
    assert ENROLL_RESULT_OTHER not in ENROLL_RESULTS
    for malformed in (b"\xff", b'{"v":1,"result":"Not A Label"}', b'{"v":1,"result":7}'):
        with pytest.raises(RevocationError):
            enroll_result_label(malformed)


def test_hello_round_trip_and_what_each_end_speaks() -> None:
    hello = decode_hello(encode_hello())
    assert hello.revoke == {1, 2} and hello.revoke_version() == 2
    assert json.loads(encode_hello()) == {"v": 1, "revoke": [1, 2]}
    assert decode_hello(encode_hello([1])).revoke_version() == 1
    assert decode_hello(encode_hello([7])).revoke_version() == 1  # nothing in common
    # A later hello: another "v", more keys, versions we do not speak; read what we know.
    later = decode_hello(b'{"v": 4, "revoke": [2, 3, 9], "compress": ["zstd"]}')
    assert later.revoke_version() == 2


@pytest.mark.parametrize(
    "body",
    [
        b"\xff",
        b"[1, 2]",
        b'{"revoke": [1, 2]}',
        b'{"v": true, "revoke": [1]}',
        b'{"v": 0, "revoke": [1]}',
        b'{"v": "1", "revoke": [1]}',
        b'{"v": 1}',
        b'{"v": 1, "revoke": 2}',
        b'{"v": 1, "revoke": [true]}',
        b'{"v": 1, "revoke": [0]}',
        b'{"v": 1, "revoke": [1.5]}',
        b'{"v": 1, "revoke": [' + b",".join([b"1"] * 17) + b"]}",
        b'{"v": 1, "revoke": [1], "pad": "' + b"x" * MAX_HELLO + b'"}',
    ],
)
def test_a_malformed_hello_is_refused(body: bytes) -> None:
    with pytest.raises(RevocationError):
        decode_hello(body)


def test_an_increment_for_an_older_gateway_drops_the_notices() -> None:
    notices = {dev("a"): NOTICE, dev("b"): NOTICE}
    (signed,) = encode_revocations(notices, full=False, notices=notices)
    (plain,) = increment_without_notices(signed)
    update = decode_revocations(plain)
    assert (update.version, update.full, update.devices) == (1, False, (dev("a"), dev("b")))
    assert increment_without_notices(plain) == [plain]
    (full,) = encode_revocations(notices, full=True, notices=notices)
    with pytest.raises(RevocationError, match="full list"):
        increment_without_notices(full)


def test_module_imports_nothing_the_gateway_must_not_load() -> None:
    code = (
        "import sys, relay.trust.revocation; "
        "bad = [m for m in ('pydicom', 'pynetdicom', 'zstandard', 'sqlite3', 'relay.agent') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
