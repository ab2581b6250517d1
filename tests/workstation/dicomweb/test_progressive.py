"""Progressive HTJ2K frames (issue 14): byte ranges of one frame's codestream, the
bounded cache that keeps the two requests on the same bytes, and the proof that a prefix
of our RPCL codestream is a lower-resolution image while the whole is the lossless one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import imagecodecs
import numpy as np
import pytest

from relay.dicom import rawds
from relay.workstation.dicomweb import htj2k, media
from relay.workstation.dicomweb.byterange import Unsatisfiable, content_range, parse_range
from relay.workstation.dicomweb.codestreams import CodestreamCache
from relay.workstation.dicomweb.htj2k import Choice, choose, encode_frames
from relay.workstation.dicomweb.server import DicomwebServer
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, get, scripted

LE = "1.2.840.10008.1.2.1"
RPCL = "1.2.840.10008.1.2.4.202"
# what cornerstone's loader sends whatever it is configured with, and the URL's accept
CORNERSTONE = "multipart/related; type=application/octet-stream; transfer-syntax=*"
PROGRESSIVE = 'image/jphc, multipart/related; type="application/octet-stream"; transfer-syntax=*'


# -- byte ranges ---------------------------------------------------------------------------


def test_one_range_is_parsed_and_clipped() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=100-", 1000) == (100, 999)  # cornerstone's second request
    assert parse_range("bytes=900-5000", 1000) == (900, 999)  # clipped to the end
    assert parse_range("bytes=-10", 1000) == (990, 999)  # the last 10
    assert parse_range("bytes=-5000", 1000) == (0, 999)
    assert parse_range("BYTES = 1 - 2", 1000) == (1, 2)
    assert content_range(0, 99, 1000) == "bytes 0-99/1000"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=5-1",
        "bytes=-",
        "bytes=a-b",
        "bytes=0-" + "9" * 30,
        "bytes=\u0663-\u0665",  # Arabic-Indic 3-5: no DIGIT of RFC 9110 (it was 3-5)
        "bytes=\uff10-\uff19",  # fullwidth 0-9
    ],
)
def test_what_is_not_one_range_is_ignored(header: str | None) -> None:
    assert parse_range(header, 1000) is None  # the whole representation (200)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_past_the_end_is_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, 1000)


# -- the cache of encoded frames -----------------------------------------------------------


def test_the_cache_is_bounded_by_count_and_bytes_least_recent_first() -> None:
    cache = CodestreamCache(max_entries=3, max_bytes=100)
    for i in range(3):
        cache.put(("sop", i, RPCL), bytes(10))
    assert cache.get(("sop", 0, RPCL)) == bytes(10)  # 0 is now the most recent
    cache.put(("sop", 3, RPCL), bytes(10))  # a fourth entry: 1 goes
    assert len(cache) == 3 and cache.get(("sop", 1, RPCL)) is None
    assert cache.get(("sop", 0, RPCL)) is not None
    # 30 bytes held (2, 3, 0 by use); 90 more: the least recent go until within 100 bytes
    cache.put(("sop", 4, RPCL), bytes(90))
    assert cache.bytes == 100 and len(cache) == 2
    assert cache.get(("sop", 2, RPCL)) is None and cache.get(("sop", 3, RPCL)) is None
    assert cache.get(("sop", 4, RPCL)) == bytes(90) and cache.evictions == 3
    cache.put(("big", 1, RPCL), bytes(101))  # larger than the budget: not kept
    assert cache.get(("big", 1, RPCL)) is None and cache.bytes == 100
    cache.put(("sop", 4, RPCL), bytes(5))  # replacing an entry counts its new size only
    assert cache.bytes == 15 and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 4)
    with pytest.raises(ValueError):
        CodestreamCache(max_entries=0)


# -- a prefix is a lower resolution, the whole is lossless -----------------------------------


def ct_frame() -> tuple[Any, np.ndarray[Any, Any]]:
    inst = CT[1]
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    dtype = "<i2" if ds.PixelRepresentation else "<u2"
    pixels = np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns)
    return ds, pixels


def shortest_exact_prefix(stream: bytes, skip: int) -> int:
    """The fewest leading bytes that decode, `skip` resolutions down, to exactly what the
    whole codestream decodes to at that resolution (binary search)."""
    want = imagecodecs.htj2k_decode(stream, skipres=skip)
    lo, hi = 0, len(stream)
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            ok = np.array_equal(imagecodecs.htj2k_decode(stream[:mid], skipres=skip), want)
        except Exception:  # OpenJPH refuses too short a prefix
            ok = False
        lo, hi = (lo, mid) if ok else (mid + 1, hi)
    return lo


def test_a_prefix_of_the_rpcl_codestream_is_the_image_at_a_lower_resolution() -> None:
    ds, pixels = ct_frame()
    [stream] = encode_frames(ds, [pixels.tobytes()])
    assert encode_frames(ds, [pixels.tobytes()]) == [stream]  # deterministic: same bytes
    assert np.array_equal(imagecodecs.htj2k_decode(stream), pixels)  # the whole: lossless
    prefixes = [shortest_exact_prefix(stream, skip) for skip in (5, 4, 3, 2, 1)]
    # resolution by resolution, each level needs more of the stream than the one below it,
    # and a quarter of the image side is there in well under a tenth of the bytes
    assert prefixes == sorted(prefixes) and prefixes[-1] < len(stream)
    quarter = prefixes[3]  # skip 2: 128x128 of 512x512
    assert quarter < len(stream) / 10, (quarter, len(stream))
    small = imagecodecs.htj2k_decode(stream[:quarter], skipres=2)
    assert small.shape == (pixels.shape[0] // 4, pixels.shape[1] // 4)
    # and it is the image, smaller: close to a 4x4 average of the original. The wavelet
    # undershoots a little below 0 at the edge of a black background, and OpenJPH hands
    # that back in the unsigned container, wrapped (a few hundred bright pixels of 16,384
    # in the first pass only): read as signed here
    mean = pixels.astype(np.float64).reshape(128, 4, 128, 4).mean(axis=(1, 3))
    signed = small.astype(np.int64)
    signed[signed > 32767] -= 65536
    assert np.median(np.abs(signed - mean)) < 0.01 * (pixels.max() - pixels.min())
    assert (signed < 0).mean() < 0.05
    print(f"\ncodestream {len(stream)} B (native {pixels.nbytes} B); exact prefixes "
          f"for 16/32/64/128/256 px: {prefixes}")  # fmt: skip


# -- choosing the bare codestream ----------------------------------------------------------


def test_a_single_part_jphc_is_one_frame_of_native_encodable_data_only() -> None:
    def pick(accept: str, *, one: bool = True, stored: str = LE, can: bool = True) -> Choice:
        ranges = media.parse_accept(accept)
        types = media.frame_media_type(stored)
        return choose(ranges, types, stored, stored == LE, can, one_frame=one)

    assert pick("image/jphc") == Choice("image/jphc", RPCL, single=True)
    ts201 = "1.2.840.10008.1.2.4.201"
    assert pick(f"image/jphc; transfer-syntax={ts201}") == Choice("image/jphc", ts201, True)
    native = Choice("application/octet-stream")
    assert pick(PROGRESSIVE, one=False) == native  # several frames: the multipart fallback
    assert pick(PROGRESSIVE, can=False) == native  # a format we cannot encode exactly
    jpeg = "1.2.840.10008.1.2.4.50"  # stored compressed: as stored
    assert pick(PROGRESSIVE, stored=jpeg) == native
    assert pick(CORNERSTONE) == native  # the header alone keeps today's answer
    with pytest.raises(media.AcceptError, match="exactly"):
        pick("image/jphc", can=False)
    with pytest.raises(media.AcceptError):
        pick("image/jphc; transfer-syntax=1.2.3")


# -- the frames route ----------------------------------------------------------------------


@pytest.fixture
async def web() -> AsyncIterator[DicomwebServer]:
    async with scripted() as (srv, _):
        yield srv


def frame_url(srv: DicomwebServer, number: int = 1) -> str:
    sop = CT[1].sop_instance
    return f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}/frames/{number}"


async def test_a_viewer_gets_a_prefix_then_the_rest_of_the_same_codestream(
    web: DicomwebServer,
) -> None:
    srv = web
    _, pixels = ct_frame()
    url = frame_url(srv) + "?accept=" + quote(PROGRESSIVE)
    first = {"Accept": CORNERSTONE, "Range": "bytes=0-16383"}
    status, headers, head = await get(url, headers=first)
    assert status == 206, head
    assert headers["Content-Type"] == f"image/jphc; transfer-syntax={RPCL}"
    total = int(headers["Content-Range"].rpartition("/")[2])
    assert headers["Content-Range"] == f"bytes 0-16383/{total}" and len(head) == 16384
    assert headers["Accept-Ranges"] == "bytes"
    second = {"Accept": CORNERSTONE, "Range": "bytes=16384-"}
    status, headers2, rest = await get(url, headers=second)
    assert status == 206 and headers2["Content-Range"] == f"bytes 16384-{total - 1}/{total}"
    etag = {k.lower(): v for k, v in headers.items()}["etag"]
    assert {k.lower(): v for k, v in headers2.items()}["etag"] == etag  # the same codestream
    stream = head + rest
    assert len(stream) == total and np.array_equal(imagecodecs.htj2k_decode(stream), pixels)
    assert imagecodecs.htj2k_decode(head, skipres=3).shape == (64, 64)  # the first pass
    service = srv.service
    assert service.frames_encoded == 1  # encoded once, the rest from the cache
    assert service.codestreams.hits == 1 and service.frame_ranges == 2
    # no Range: the whole, 200; the same through the Accept header
    status, headers, whole = await get(url)
    assert status == 200 and whole == stream and "Content-Range" not in headers
    status, _, whole = await get(frame_url(srv), headers={"Accept": "image/jphc"})
    assert status == 200 and whole == stream
    # a range past the end: 416 naming the size; several ranges: ignored (the whole)
    status, headers, _ = await get(url, headers={"Range": f"bytes={total}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{total}"
    status, _, body = await get(url, headers={"Range": "bytes=0-1,5-9"})
    assert status == 200 and body == stream
    assert service.frames_encoded == 1 and service.frame_ranges_refused == 1


async def test_without_jphc_frames_and_ranges_are_as_before(web: DicomwebServer) -> None:
    srv = web
    _, pixels = ct_frame()
    status, headers, body = await get(frame_url(srv), headers={"Accept": CORNERSTONE,
                                                               "Range": "bytes=0-9"})  # fmt: skip
    assert status == 200 and headers["Content-Type"].startswith("multipart/related")
    assert pixels.tobytes() in body and "Content-Range" not in headers
    # several frames take the multipart native fallback (choose(one_frame=False), above);
    # this instance has one, and one frame asked twice is refused
    url = frame_url(srv) + "?accept=" + quote(PROGRESSIVE)
    assert (await get(url.replace("/frames/1", "/frames/1,1")))[0] == 400
    assert (await get(url.replace("/frames/1", "/frames/9")))[0] == 404  # no such frame
    assert srv.service.frames_encoded == 0


async def test_the_cache_bound_holds_and_an_evicted_frame_comes_back_identical(
    web: DicomwebServer,
) -> None:
    srv = web
    srv.service.codestreams = CodestreamCache(max_entries=1)
    urls = [f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{i.sop_instance}/frames/1"
            "?accept=image/jphc" for i in CT[:2]]  # fmt: skip
    status, _, a = await get(urls[0], headers={"Range": "bytes=0-999"})
    assert status == 206
    assert (await get(urls[1]))[0] == 200  # evicts the first frame
    assert len(srv.service.codestreams) == 1 and srv.service.codestreams.evictions == 1
    status, _, b = await get(urls[0], headers={"Range": "bytes=1000-"})
    assert status == 206 and srv.service.frames_encoded == 3  # encoded again...
    whole = (await get(urls[0]))[2]
    assert a + b == whole  # ...to the same bytes, so the two halves still fit
    assert htj2k.MEDIA_TYPE == "image/jphc"


async def test_a_frame_wanted_twice_at_once_is_encoded_once() -> None:
    cache = CodestreamCache()
    key = ("sop", 1, RPCL)
    release = asyncio.Event()
    made = 0

    async def make() -> bytes:
        nonlocal made
        made += 1
        await release.wait()
        return b"codestream"

    first = asyncio.ensure_future(cache.obtain(key, make))
    second = asyncio.ensure_future(cache.obtain(key, make))
    await asyncio.sleep(0)  # both are waiting now
    release.set()
    assert await first == await second == b"codestream"
    assert made == 1 and cache.shared == 1 and len(cache) == 1
    assert await cache.obtain(key, make) == b"codestream" and made == 1  # kept


async def test_a_failed_or_abandoned_encoding_is_not_kept() -> None:
    cache = CodestreamCache()
    key = ("sop", 1, RPCL)
    release = asyncio.Event()

    async def fail() -> bytes:
        await release.wait()
        raise htj2k.Unsupported("no")

    first = asyncio.ensure_future(cache.obtain(key, fail))
    second = asyncio.ensure_future(cache.obtain(key, fail))
    await asyncio.sleep(0)
    release.set()
    for task in (first, second):  # the error reaches the waiter too
        with pytest.raises(htj2k.Unsupported):
            await task
    assert len(cache) == 0
    release.clear()

    async def ok() -> bytes:
        return b"mine"

    abandoned = asyncio.ensure_future(cache.obtain(key, fail))
    waiter = asyncio.ensure_future(cache.obtain(key, ok))
    await asyncio.sleep(0)
    abandoned.cancel()  # the client that started the encoding went away
    assert await waiter == b"mine"  # the waiter made its own
    assert len(cache) == 1
