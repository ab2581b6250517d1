"""Accept negotiation (no transcoding) and the multipart writer, read back by a real parser."""

from __future__ import annotations

import email
import email.policy

import pytest

from relay.workstation.dicomweb import media

ELE = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"


def test_accept_is_parsed_with_quoted_parameters_and_q_order() -> None:
    ranges = media.parse_accept(
        'multipart/related; type="application/dicom"; q=0.5, '
        'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    )
    assert ranges[0].inner == "application/octet-stream"
    assert ranges[0].params["transfer-syntax"] == "*"
    assert ranges[1].inner == "application/dicom" and ranges[1].q == 0.5
    assert media.parse_accept(None)[0].type == "*/*"
    assert media.parse_accept("a/b;q=0") == []


@pytest.mark.parametrize(
    ("accept", "ts"),
    [
        ('multipart/related; type="application/dicom"', ELE),
        ('multipart/related; type="application/dicom"', JPEG),  # no parameter: as stored
        ('multipart/related; type="application/dicom"; transfer-syntax=*', JPEG),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}', JPEG),
        ("*/*", ELE),
        ("multipart/related", ELE),
        (None, ELE),
    ],
)
def test_instances_are_served_as_stored_when_the_accept_allows(accept: str | None, ts: str) -> None:
    ranges = media.parse_accept(accept)
    assert media.negotiate(ranges, True, ("application/dicom",), ts) == "application/dicom"


@pytest.mark.parametrize(
    "accept",
    [
        f'multipart/related; type="application/dicom"; transfer-syntax={ELE}',  # stored as JPEG
        "application/dicom+json",
        'multipart/related; type="image/png"',
    ],
)
def test_what_would_need_transcoding_is_406(accept: str) -> None:
    with pytest.raises(media.AcceptError):
        media.negotiate(media.parse_accept(accept), True, ("application/dicom",), JPEG)


def test_frames_of_a_compressed_instance_may_be_octet_stream_or_their_image_type() -> None:
    types = media.frame_media_type(JPEG)
    ohif = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    chosen = media.negotiate(media.parse_accept(ohif), True, types, JPEG)
    assert chosen == "application/octet-stream"
    jpeg = 'multipart/related; type="image/jpeg"'
    assert media.negotiate(media.parse_accept(jpeg), True, types, JPEG) == "image/jpeg"
    assert media.frame_media_type(ELE) == ("application/octet-stream",)


def test_the_multipart_writer_is_read_back_part_for_part() -> None:
    boundary = media.new_boundary()
    parts = [b"first\r\n--not-a-boundary", b"", bytes(range(256)) * 10]
    body = b"".join(media.part_head(boundary, "application/dicom", f"/x/{i}") + p
                    for i, p in enumerate(parts)) + media.closing(boundary)  # fmt: skip
    head = f"Content-Type: {media.multipart_type(boundary, 'application/dicom')}\r\n\r\n"
    message = email.message_from_bytes(head.encode() + body, policy=email.policy.HTTP)
    got = []
    for i, part in enumerate(message.iter_parts()):
        assert part["Content-Type"] == "application/dicom"
        assert part["Content-Location"] == f"/x/{i}"
        got.append(part.get_payload(decode=True))
    assert got == parts
