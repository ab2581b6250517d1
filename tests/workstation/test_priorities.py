"""The workstation's streams carry their urgency: prefetch in the background, a viewer's
own requests (DICOMweb, the DICOM node) at the default, so the agent sends theirs first."""

from __future__ import annotations

from relay.dicom.codec import DicomLimits, MessageCodec
from relay.net.bytestream import ByteStream
from relay.proto import DEFAULT_PRIORITY, Priority
from relay.proto.priority import parse_priority
from relay.wire import HEADER_PRIORITY
from relay.workstation import priorities
from relay.workstation.cache.fetch import StudyFetcher
from relay.workstation.dicomweb.source import DicomSource


async def _never(headers: object) -> ByteStream:
    raise AssertionError("no stream in this test")


def test_prefetch_is_background_and_viewer_requests_are_default() -> None:
    assert Priority(6) == priorities.PREFETCH
    assert priorities.VIEWER == DEFAULT_PRIORITY
    assert priorities.PREFETCH.urgency > priorities.VIEWER.urgency


def test_prefetch_streams_open_at_the_prefetch_urgency() -> None:
    fetcher = StudyFetcher(_never, store=None, codec=MessageCodec(DicomLimits()))  # type: ignore[arg-type]
    assert parse_priority(fetcher.headers[HEADER_PRIORITY]) == priorities.PREFETCH


def test_dicomweb_retrievals_open_at_the_viewer_urgency() -> None:
    source = DicomSource(_never, MessageCodec(DicomLimits()), timeout=1.0)
    assert parse_priority(source.headers[HEADER_PRIORITY]) == priorities.VIEWER
