"""Agent-signed revocation notices: their form, and what a device accepts as proof."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.trust import pki
from relay.trust.notice import CONTEXT, NOTICE_LENGTH, NoticeError, sign_notice, verify_notice
from relay.trust.revocation import MAX_NOTICE, NOTICE_RE, goaway_reason
from tests.pki_helpers import SitePki, make_pki

WS1 = "spiffe://hospital.test/device/main/ws1"
WS2 = "spiffe://hospital.test/device/main/ws2"
ENROLLED = datetime(2030, 1, 1, tzinfo=UTC)  # the device certificate's notBefore
REVOKED = ENROLLED + timedelta(days=3, seconds=0.75)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def check(site: SitePki, notice: str, uri: str = WS1, not_before: datetime = ENROLLED) -> datetime:
    return verify_notice(
        notice, ca_keys=[site.ca_cert.public_key()], uri=uri, not_before=not_before
    )


def test_a_good_notice_verifies_and_fits_a_gateway(site: SitePki) -> None:
    notice = sign_notice(site.ca_key, WS1, REVOKED)
    assert len(notice) == NOTICE_LENGTH <= MAX_NOTICE and NOTICE_RE.fullmatch(notice)
    assert len(goaway_reason(notice).encode()) <= 256
    assert check(site, notice) == REVOKED.replace(microsecond=0)
    # Revoked in the very second the certificate starts: still good.
    assert check(site, notice, not_before=REVOKED.replace(microsecond=0)) is not None


def test_a_notice_for_another_device_proves_nothing(site: SitePki) -> None:
    with pytest.raises(NoticeError, match="not signed by this site's CA for this device"):
        check(site, sign_notice(site.ca_key, WS2, REVOKED))


def test_a_notice_of_another_ca_proves_nothing(site: SitePki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")  # same trust domain and site, another key
    with pytest.raises(NoticeError, match="not signed by this site's CA"):
        check(site, sign_notice(other.ca_key, WS1, REVOKED))
    # Among several pinned CAs, the one that signed it is enough.
    notice = sign_notice(other.ca_key, WS1, REVOKED)
    keys = [site.ca_cert.public_key(), other.ca_cert.public_key()]
    assert verify_notice(notice, ca_keys=keys, uri=WS1, not_before=ENROLLED)


def test_a_notice_older_than_the_certificate_is_an_old_revocation(site: SitePki) -> None:
    notice = sign_notice(site.ca_key, WS1, ENROLLED - timedelta(seconds=1))
    with pytest.raises(NoticeError, match="predates this device's certificate"):
        check(site, notice)
    assert check(site, notice, not_before=ENROLLED - timedelta(days=1))


def _flip(text: str, index: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    swapped = alphabet[(alphabet.index(text[index]) + 1) % len(alphabet)]
    return text[:index] + swapped + text[index + 1 :]


@pytest.mark.parametrize("index", [4, 10, 16, 30, 60, 100])
def test_a_tampered_character_is_refused(site: SitePki, index: int) -> None:
    """The time (4..14) or the signature (16..101): a changed character proves nothing."""
    notice = sign_notice(site.ca_key, WS1, REVOKED)
    with pytest.raises(NoticeError):
        check(site, _flip(notice, index))


def test_a_later_time_cannot_be_grafted_on(site: SitePki) -> None:
    """Moving the time past a re-enrollment breaks the signature."""
    notice = sign_notice(site.ca_key, WS1, ENROLLED - timedelta(days=1))
    later = base64.urlsafe_b64encode(int(REVOKED.timestamp()).to_bytes(8, "big"))
    forged = f"rn1.{later.rstrip(b'=').decode()}.{notice.rsplit('.', 1)[1]}"
    with pytest.raises(NoticeError, match="not signed"):
        check(site, forged)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rn1",
        "rn2.AAAAAGsWQwA." + "A" * 86,
        "rn1.AAAAAGsWQwA." + "A" * 85,
        "rn1.AAAAAGsWQwA." + "A" * 87,
        "rn1.AAAAAGsWQwA." + "A" * 85 + "=",
        "rn1.AAAAAGsWQwB." + "A" * 86,  # not canonical: the last character's spare bits
        "rn1.AAAAAGsWQwA." + "A" * 85 + "B",
        "x" * 10_000,
    ],
)
def test_garbage_is_not_a_notice(site: SitePki, text: str) -> None:
    with pytest.raises(NoticeError):
        check(site, text)


@given(st.text(max_size=300))
def test_any_text_is_refused_with_a_notice_error(text: str) -> None:
    key = pki.generate_key().public_key()
    with pytest.raises(NoticeError):
        verify_notice(text, ca_keys=[key], uri=WS1, not_before=ENROLLED)


def test_the_signed_message_is_bound_to_its_context() -> None:
    """Nothing else the CA key signs (DER certificates, CRLs) starts like a notice."""
    assert CONTEXT.endswith(b"\0") and CONTEXT[0] != 0x30
