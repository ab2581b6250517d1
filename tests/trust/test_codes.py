"""Enrollment codes: round trip, tolerance of pasting, and one-line errors for bad input."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.ops.config import Address
from relay.trust import codes as tokens
from relay.trust.codes import (
    CODE_PREFIX,
    SECRET_BYTES,
    CodeError,
    EnrollmentCode,
    decode_secret,
    encode_secret,
    hash_secret,
    new_secret,
    new_token_id,
    parse_code,
    secret_matches,
)

FP = hashlib.sha256(b"ca").hexdigest()


def make(**overrides: object) -> EnrollmentCode:
    fields: dict[str, object] = {
        "gateway": Address("dmz.hospital.example", 8443),
        "ca_fingerprint": FP,
        "site": "main",
        "device": "reader-7",
        "token_id": new_token_id(),
        "secret": new_secret(),
    }
    fields.update(overrides)
    return EnrollmentCode(**fields)  # type: ignore[arg-type]


def test_round_trip_and_shape() -> None:
    code = make()
    text = code.encode()
    assert text.startswith(CODE_PREFIX)
    assert "=" not in text
    assert set(text[len(CODE_PREFIX) :]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert parse_code(text) == code


def test_secret_has_at_least_128_bits() -> None:
    assert SECRET_BYTES * 8 >= 128
    assert len({new_secret() for _ in range(100)}) == 100


def test_ipv6_gateway_round_trips() -> None:
    code = make(gateway=Address("::1", 9443))
    assert parse_code(code.encode()).gateway == Address("::1", 9443)


def test_pasting_is_forgiven() -> None:
    code = make()
    text = code.encode()
    mangled = "  " + text[:20].lower() + "\n" + text[20:40] + " \t" + text[40:] + "\n"
    assert parse_code(mangled) == code


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello", "not an enrollment code"),
        ("DMZR9-AAAA", "not supported by this relay"),
        (CODE_PREFIX + "1111", "characters outside A-Z and 2-7"),
        (CODE_PREFIX + "AAAA", "incomplete"),
        ("x" * 5000, "longer than"),
    ],
)
def test_bad_codes_give_one_line(text: str, message: str) -> None:
    with pytest.raises(CodeError, match=message) as info:
        parse_code(text)
    assert "\n" not in str(info.value)


def test_a_damaged_character_is_caught_by_the_checksum() -> None:
    text = make().encode()
    i = len(CODE_PREFIX) + 10
    damaged = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(CodeError, match="checksum"):
        parse_code(damaged)


def test_a_truncated_code_is_refused() -> None:
    text = make().encode()
    with pytest.raises(CodeError, match=r"incomplete|checksum|damaged"):
        parse_code(text[:-8])


def _reencode(record: bytes) -> str:
    record += hashlib.sha256(record).digest()[: tokens.CHECK_BYTES]
    return CODE_PREFIX + base64.b32encode(record).decode().rstrip("=")


def _record(text: str) -> bytes:
    """The record of a code, without its checksum."""
    body = text[len(CODE_PREFIX) :]
    return base64.b32decode(body + "=" * (-len(body) % 8))[: -tokens.CHECK_BYTES]


def test_reencoding_a_record_gives_the_same_code() -> None:
    text = make().encode()
    assert _reencode(_record(text)) == text


def test_unknown_version_is_refused_with_its_number() -> None:
    good = _record(make().encode())
    with pytest.raises(CodeError, match="version 7"):
        parse_code(_reencode(bytes([7]) + good[1:]))


def test_trailing_data_is_refused() -> None:
    record = _record(make().encode())
    with pytest.raises(CodeError, match="trailing"):
        parse_code(_reencode(record + b"\x00"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"ca_fingerprint": "ab"},
        {"site": "bad site"},
        {"device": ""},
        {"token_id": "XYZ"},
        {"secret": b"short"},
    ],
)
def test_fields_are_validated(overrides: dict[str, object]) -> None:
    with pytest.raises(CodeError):
        make(**overrides)


@given(st.text(max_size=300))
def test_parse_never_raises_anything_else(text: str) -> None:
    try:
        parse_code(text)
    except CodeError as exc:
        assert "\n" not in str(exc)


@given(st.binary(max_size=200))
def test_parse_of_random_records_only_raises_code_error(record: bytes) -> None:
    with contextlib.suppress(CodeError):
        parse_code(_reencode(record))


def test_secret_hash_and_comparison() -> None:
    token_id, secret = new_token_id(), new_secret()
    stored = hash_secret(token_id, secret)
    assert secret not in stored
    assert secret_matches(token_id, secret, stored)
    assert not secret_matches(token_id, new_secret(), stored)
    assert not secret_matches(new_token_id(), secret, stored)  # bound to its token id


def test_secret_wire_encoding() -> None:
    secret = new_secret()
    assert decode_secret(encode_secret(secret)) == secret
    for bad in ("", "!!!", encode_secret(b"x" * 10), "A" * 100):
        with pytest.raises(CodeError):
            decode_secret(bad)


def _version(text: str) -> int:
    body = text[len(CODE_PREFIX) :]
    return base64.b32decode(body + "=" * (-len(body) % 8))[0]


def test_a_code_for_a_directory_user_is_version_2() -> None:
    code = make(user="j.doe")
    text = code.encode()
    assert parse_code(text) == code and parse_code(text).user == "j.doe"
    assert _version(text) == 2
    plain = make().encode()
    assert _version(plain) == 1 and parse_code(plain).user is None  # older PCs read it


@pytest.mark.parametrize("user", ["", "a b", "x)(uid=*", "-lead", "é"])
def test_a_bad_user_name_is_refused(user: str) -> None:
    with pytest.raises(CodeError, match="user name"):
        make(user=user)
