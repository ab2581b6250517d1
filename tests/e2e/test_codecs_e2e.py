"""Issue 14 end to end: pixel codecs through `relay agent` and `relay workstation`.

The chain of tests/e2e/test_dicom_e2e.py (real processes, real TLS on loopback, the
embedded PACS in its own process) with the agent told to send pixels in one codec
(`pixel_codecs: jpegls` / `htj2k` / `jpegxl`: every instance that round-trips, whatever the link).
getscu through the relay must write exactly the PACS's bytes; instances whose pixels
cannot round-trip (bits above BitsStored) go as zstd and arrive identical as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.codecs import find_pixels
from relay_dev import samples
from tests.e2e.dicom_chain import (
    HOST,
    PACS_AE,
    DicomChain,
    PacsProcess,
    bytes_by_instance,
    counts_after,
    running_dicom_chain,
)
from tests.interop.harness import DicomNode, dcmtk, require_tools

pytestmark = pytest.mark.interop
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("getscu", "storescu")
    server = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["jpegls", "htj2k", "jpegxl"])
def chain(
    request: pytest.FixtureRequest, pacs: PacsProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"), pacs.port, pacs_extra=f", pixel_codecs: {request.param}"
    )
    with running_dicom_chain(c):
        yield c


def _codec(chain: DicomChain) -> str:
    return chain.pacs_extra.rsplit(" ", 1)[-1]


@pytest.mark.parametrize("study", ["CT", "MR"])
def test_getscu_writes_the_pacs_bytes_with_pixels_encoded(
    chain: DicomChain, pacs: PacsProcess, study: str, tmp_path: Path
) -> None:
    held = {i.sop_instance: i.data for i in samples.demo_studies()
            if (i.sop_class == samples.CT_IMAGE_STORAGE) == (study == "CT")}  # fmt: skip
    patient = samples.CT_STUDY.patient_id if study == "CT" else samples.MR_STUDY.patient_id
    direct = DicomNode(HOST, pacs.port, PACS_AE)
    uid = dcmtk.findscu(direct, "STUDY", {"PatientID": patient}, timeout=TIMEOUT).values(
        "StudyInstanceUID")[0]  # fmt: skip
    before = chain.codec_counts()
    got = dcmtk.getscu(chain.node, tmp_path / "relay", "STUDY", {"StudyInstanceUID": uid},
                       extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success"
    assert bytes_by_instance(got.files) == held
    # ... and the pixels did travel as codestreams, every instance of the study.
    assert counts_after(chain, before, len(held)) == {_codec(chain): len(held)}


def _odd_study() -> list[samples.EncodedInstance]:
    """Three CT slices of an odd size (127x129), one with an overlay bit above BitsStored
    (12). (The smallest instances, below 16 KiB, would go as zstd anyway.)"""
    spec = samples.StudySpec(patient_name="ODD^PIXELS", patient_id="RELAYODD1")
    first, garbage, last = samples.make_study(3, spec=spec, rows=127, cols=129, seed=77)
    layout = find_pixels(garbage.data, garbage.transfer_syntax)
    assert layout is not None and layout.fmt.bits == 16
    data = bytearray(garbage.data)
    data[layout.offset + 1001] |= 0x80  # bit 15 of one sample: no longer within 12 bits
    garbage = samples.EncodedInstance(garbage.sop_class, garbage.sop_instance,
                                      garbage.transfer_syntax, bytes(data))  # fmt: skip
    assert find_pixels(garbage.data, garbage.transfer_syntax) is None
    return [first, garbage, last]


def test_pixels_that_cannot_round_trip_go_as_zstd_and_arrive_identical(
    chain: DicomChain, pacs: PacsProcess, tmp_path: Path
) -> None:
    direct = DicomNode(HOST, pacs.port, PACS_AE)
    odd = _odd_study()
    paths = []
    for i, inst in enumerate(odd):
        path = tmp_path / "up" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    assert dcmtk.storescu(direct, paths, timeout=TIMEOUT).ok
    found = dcmtk.findscu(direct, "STUDY", {"PatientID": "RELAYODD1"}, timeout=TIMEOUT)
    keys = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
    before = chain.codec_counts()
    got = dcmtk.getscu(chain.node, tmp_path / "relay", "STUDY", keys, extra_args=["+B"],
                       timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success"
    assert len(got.files) == len(odd)
    assert bytes_by_instance(got.files) == {i.sop_instance: i.data for i in odd}
    # The one with the stray bit went as zstd, the others encoded.
    assert counts_after(chain, before, len(odd)) == {"zstd": 1, _codec(chain): 2}
