"""The prefetcher and the DICOMweb source take pixel codecs too, like the DICOM node.

A real agent (serve_dicom_stream on an in-memory pipe) retrieves from an embedded PACS.
Each path announces the workstation's codec offer, rebuilds the PACS's exact bytes,
decodes encoded pixels off the event loop, and after an instance that does not decode
exactly drops that codec from the offer, so that asking again succeeds without it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom.agent import serve_dicom_stream
from relay.dicom.codec import DicomLimits, Message, MessageCodec, has_pixels
from relay.dicom.offer import CodecOffer
from relay.dicom.pacs_target import PacsTarget, PixelCodecs
from relay.net.bytestream import ByteStream, pipe
from relay.wire import HEADER_DICOM_PIXELS
from relay.workstation.cache.fetch import FetchError, StudyFetcher
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.store import CacheStore
from relay.workstation.dicomweb.source import DicomSource, UpstreamError
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

STUDY = samples.make_study(6, rows=128, cols=128, seed=29)
UID = str(rawds.decode_dataset(STUDY[0].data, STUDY[0].transfer_syntax).StudyInstanceUID)
BY_UID = {i.sop_instance: i.data for i in STUDY}


class Recording(MessageCodec):
    """The workstation's codec, noting the thread of every pixel decode; `flip` alters
    the CRC of the next so many encoded instances: to the workstation, a codec that did
    not give back the agent's pixels."""

    def __init__(self) -> None:
        super().__init__(DicomLimits(), accept_pixels=True)
        self.pixel_threads: list[int] = []
        self.flip = 0

    def decode(self, payload: bytes | bytearray | memoryview) -> Message:
        if has_pixels(payload):
            self.pixel_threads.append(threading.get_ident())
            if self.flip > 0:
                self.flip -= 1
                payload = bytearray(payload)
                end = payload.index(b'"crc":') + 6
                while chr(payload[end]).isdigit():
                    end += 1
                payload[end - 1] = ord("0") + (payload[end - 1] - ord("0") + 1) % 10
        return super().decode(payload)


class Agent:
    """Streams served by a real agent against `pacs`; records each stream's headers."""

    def __init__(self, pacs: EmbeddedPacs, codecs: str = "htj2k") -> None:
        base = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
        self.target = replace(base, pixel_codecs=cast(PixelCodecs, codecs))
        self.headers: list[dict[str, str]] = []
        self.tasks: set[asyncio.Task[object]] = set()

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        self.headers.append(dict(headers))
        a, b = pipe(headers)
        task = asyncio.create_task(serve_dicom_stream(b, self.target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return a

    def announced(self, i: int) -> list[str]:
        return self.headers[i].get(HEADER_DICOM_PIXELS, "").split(",")


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(STUDY)) as p:
        yield p


def _store(tmp_path: Path) -> CacheStore:
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=64 << 20, max_age=600)
    store.open(fresh_key=True)
    return store


def _study_query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = UID
    return ds


async def test_a_prefetch_takes_pixel_codecs_and_caches_the_pacs_bytes(
    pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    agent, codec, store = Agent(pacs), Recording(), _store(tmp_path)
    fetcher = StudyFetcher(agent.open_stream, store, codec, timeout=30, offer=CodecOffer())
    result = await asyncio.wait_for(fetcher.fill(UID, "test"), 60)
    assert result.complete and result.instances == len(STUDY)
    study = store.study(UID)
    assert study is not None
    assert {u: store.read(i) for u, i in study.instances.items()} == BY_UID
    assert "htj2k" in agent.announced(-1)
    assert len(codec.pixel_threads) == len(STUDY)  # every instance came encoded...
    assert threading.get_ident() not in codec.pixel_threads  # ...and decoded off the loop


async def test_a_prefetch_whose_pixels_fail_their_check_goes_again_without_the_codec(
    pacs: EmbeddedPacs, tmp_path: Path
) -> None:
    agent, codec, store, offer = Agent(pacs), Recording(), _store(tmp_path), CodecOffer()
    fetcher = StudyFetcher(agent.open_stream, store, codec, timeout=30, offer=offer)
    codec.flip = 1
    with pytest.raises(FetchError, match="pixel check"):
        await asyncio.wait_for(fetcher.fill(UID, "test"), 60)
    assert "htj2k" not in offer.names
    study = store.study(UID)
    assert study is not None and not study.complete  # nothing half-received is complete
    result = await asyncio.wait_for(fetcher.fill(UID, "test"), 60)
    assert result.complete and "htj2k" not in agent.announced(-1)
    study = store.study(UID)
    assert study is not None
    assert {u: store.read(i) for u, i in study.instances.items()} == BY_UID


async def test_the_dicomweb_source_takes_pixel_codecs_and_gives_the_pacs_bytes(
    pacs: EmbeddedPacs,
) -> None:
    agent, codec = Agent(pacs), Recording()
    source = DicomSource(agent.open_stream, codec, timeout=30, offer=CodecOffer())
    got = {m.sop_instance: m.dataset async for m in source.retrieve(_study_query())}
    assert got == BY_UID
    assert "htj2k" in agent.announced(-1)
    assert len(codec.pixel_threads) == len(STUDY)
    assert threading.get_ident() not in codec.pixel_threads


async def test_the_dicomweb_source_answers_502_then_goes_without_the_codec(
    pacs: EmbeddedPacs,
) -> None:
    agent, codec, offer = Agent(pacs), Recording(), CodecOffer()
    source = DicomSource(agent.open_stream, codec, timeout=30, offer=offer)
    codec.flip = 1
    with pytest.raises(UpstreamError, match="pixel check") as caught:
        async for _ in source.retrieve(_study_query()):
            pass
    assert caught.value.http_status == 502
    assert "htj2k" not in offer.names
    got = {m.sop_instance: m.dataset async for m in source.retrieve(_study_query())}
    assert got == BY_UID and "htj2k" not in agent.announced(-1)
