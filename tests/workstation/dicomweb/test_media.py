"""Accept negotiation (no transcoding) and the multipart writer, read back by a real parser."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from relay.workstation.dicomweb import htj2k, media

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
    assert media.acceptable(media.parse_accept("a/b;q=0")) == []  # kept, but refuses only
    assert media.parse_accept("a/b;q=x") == []  # a malformed weight says nothing


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


DCM = "application/dicom"
PART = 'multipart/related; type="application/dicom"'


# RFC 9110 12.5.1: the most specific range matching an answer gives its quality.
@pytest.mark.parametrize(
    ("accept", "media_type", "params", "q"),
    [
        ("application/dicom+json;q=0, */*", "application/dicom+json", {}, 0.0),
        ("application/dicom+json;q=0, */*", "application/json", {}, 1.0),
        ("application/*;q=0, */*", "application/json", {}, 0.0),
        ("application/*;q=0, application/json;q=0.4, */*", "application/json", {}, 0.4),
        ("*/*;q=0, application/dicom+json", "application/dicom+json", {}, 1.0),
        ("*/*;q=0.2, application/*;q=0.5", "image/png", {}, 0.2),
        ("text/html", "application/dicom+json", {}, 0.0),  # no range: not acceptable
        ("application/dicom+json; charset=utf-8", "application/dicom+json", {}, 1.0),
        (f"{PART}; q=0, */*", "multipart/related", {"type": DCM, "transfer-syntax": ELE}, 0.0),
        (f"{PART}; q=0, */*", "multipart/related", {"type": "image/jpeg"}, 1.0),
        (f"{PART}; transfer-syntax={JPEG}; q=0, {PART}; transfer-syntax=*",
         "multipart/related", {"type": DCM, "transfer-syntax": JPEG}, 0.0),
        (f"{PART}; transfer-syntax={JPEG}; q=0, {PART}; transfer-syntax=*",
         "multipart/related", {"type": DCM, "transfer-syntax": ELE}, 1.0),
        ('multipart/related; type="application/*"; q=0.3, multipart/*',
         "multipart/related", {"type": DCM, "transfer-syntax": ELE}, 0.3),
        ("image/jpeg;q=0, image/*;q=0.5", "image/png", {}, 0.5),
    ],
)  # fmt: skip
def test_the_most_specific_range_decides_the_quality(
    accept: str, media_type: str, params: dict[str, str], q: float
) -> None:
    assert media.quality(media.parse_accept(accept), media_type, params) == q


def test_a_q0_range_refuses_what_a_broader_one_accepts() -> None:
    assert not media.accepts_json(media.parse_accept("application/dicom+json;q=0, */*"))
    assert not media.accepts_json(media.parse_accept("application/*;q=0, */*"))
    assert media.accepts_json(media.parse_accept("application/*;q=0, application/json"))
    assert media.accepts_json(media.parse_accept("application/dicom+json;q=0, application/json"))
    with pytest.raises(media.AcceptError):
        media.negotiate(media.parse_accept(f"{PART};q=0, */*"), True, (DCM,), ELE)
    refused_jpeg = f"{PART}; transfer-syntax={JPEG}; q=0, {PART}; transfer-syntax=*"
    assert media.negotiate(media.parse_accept(refused_jpeg), True, (DCM,), ELE) == DCM
    with pytest.raises(media.AcceptError):
        media.negotiate(media.parse_accept(refused_jpeg), True, (DCM,), JPEG)
    # frames: octet-stream refused more specifically than */* accepts it: 406
    refused = media.parse_accept('*/*, multipart/related; type="application/octet-stream";q=0')
    with pytest.raises(media.AcceptError):
        htj2k.choose(refused, media.frame_media_type(ELE), ELE, True, True)
    assert htj2k.satisfiable(refused, one_frame=True)  # stored as JPEG: its image/jpeg


@pytest.mark.parametrize(
    ("accept", "one_frame", "possible"),
    [
        ("*/*", False, True),
        ("text/html, application/dicom+json", True, False),
        ("multipart/*;q=0, */*", True, False),  # and */* alone never means one codestream
        ("multipart/*;q=0, image/jphc", True, True),
        ("multipart/*;q=0, image/jphc", False, False),  # a codestream is one frame
        ('multipart/related; type="image/jpeg"', False, True),  # if stored as JPEG
        ('multipart/related; type="image/png"', False, False),  # never stored so
    ],
)  # fmt: skip
def test_whether_a_frames_request_could_be_answered(
    accept: str, one_frame: bool, possible: bool
) -> None:
    assert htj2k.satisfiable(media.parse_accept(accept), one_frame=one_frame) is possible


SPECIFIC = ["application/dicom+json", "application/json", "image/jpeg", "image/png",
            "text/html", "application/octet-stream"]  # fmt: skip
WIDER = ["*/*", "application/*", "image/*", "text/*"]


@given(
    hs.sampled_from(SPECIFIC),
    hs.lists(
        hs.tuples(hs.sampled_from(WIDER + SPECIFIC), hs.sampled_from([0, 0.1, 0.5, 1])), max_size=6
    ),
)
def test_a_q0_range_naming_the_type_always_refuses_it(
    media_type: str, others: list[tuple[str, float]]
) -> None:
    """Whatever wider ranges say (and in whatever order), the type named with q=0 (and
    not named again with a weight) is not acceptable; named with a weight, that weight."""
    others = [(t, q) for t, q in others if t != media_type]
    header = ", ".join([*(f"{t};q={q}" for t, q in others), f"{media_type};q=0"])
    assert media.quality(media.parse_accept(header), media_type) == 0.0
    header = ", ".join([*(f"{t};q={q}" for t, q in others), f"{media_type};q=0.7"])
    assert media.quality(media.parse_accept(header), media_type) == 0.7


@pytest.mark.parametrize(
    ("accept", "possible"),
    [
        ("application/dicom+json", False),
        ('multipart/related; type="application/dicom+xml"', False),
        ("text/html, image/*", False),
        (f"{PART};q=0, */*", False),
        (f"{PART}; transfer-syntax={JPEG}", True),  # if the series is stored so
        (f"{PART}; transfer-syntax={JPEG}; q=0, {PART}", True),  # any other syntax
        ("*/*", True),
        (PART, True),
    ],
)  # fmt: skip
def test_whether_some_stored_syntax_could_be_answered(accept: str, possible: bool) -> None:
    assert media.negotiable(media.parse_accept(accept), True, (DCM,)) is possible


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
