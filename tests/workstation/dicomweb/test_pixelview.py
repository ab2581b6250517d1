"""pixelview.read: the dataset pydicom reads, element for element, but with its Pixel Data
a view of the instance's bytes instead of a copy, in every syntax the server meets."""

from __future__ import annotations

import numpy as np
import pytest

from relay.dicom import rawds
from relay.workstation.dicomweb import pixelview
from relay_dev import samples
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb.test_frame_syntaxes import BE32, CASES, COMPRESSED

ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"

INSTANCES = {
    **{sop: inst for sop, (inst, _) in CASES.items()},
    **COMPRESSED,
    "be32": BE32,
    **{i.sop_instance: i for i in samples.demo_studies(ct_slices=1, mr_slices=1)},
}


def _value(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value


@pytest.mark.parametrize("sop", sorted(INSTANCES))
def test_the_dataset_is_pydicoms_with_pixel_data_a_view(sop: str) -> None:
    inst = INSTANCES[sop]
    want = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    got = pixelview.read(inst.data, inst.transfer_syntax)
    assert [(e.tag, e.VR) for e in got] == [(e.tag, e.VR) for e in want]
    for mine, theirs in zip(got, want, strict=True):
        assert _value(mine.value) == _value(theirs.value), mine.tag
        assert mine.is_undefined_length == theirs.is_undefined_length, mine.tag
    view = got.PixelData
    assert isinstance(view, memoryview)
    if inst.transfer_syntax != "1.2.840.10008.1.2.1.99":  # deflated: inflated first
        assert view.obj is inst.data  # the held bytes themselves, not a copy


def test_elements_after_pixel_data_and_none_at_all_are_read() -> None:
    ds = rawds.decode_dataset(CASES["1.2.9.8"][0].data, "1.2.840.10008.1.2")
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # Data Set Trailing Padding, after Pixel Data
    data = rawds.encode_dataset(ds, "1.2.840.10008.1.2.1")
    got = pixelview.read(data, "1.2.840.10008.1.2.1")
    assert isinstance(got.PixelData, memoryview) and got[0xFFFCFFFC].value == b"\0" * 8
    del ds.PixelData, ds[0xFFFCFFFC]
    data = rawds.encode_dataset(ds, "1.2.840.10008.1.2.1")
    assert "PixelData" not in pixelview.read(data, "1.2.840.10008.1.2.1")


def test_a_pixel_data_element_that_does_not_read_is_left_to_pydicom() -> None:
    """Fragments without their sequence delimiter, the last one cut: the walk gives up
    and pydicom reads the dataset whole, as before (it leaves that Pixel Data out)."""
    inst = INSTANCES["1.2.9.20"]  # deflated frames, encapsulated
    cut = inst.data[:-12]  # the sequence delimiter and the end of the last fragment
    with pytest.warns(UserWarning, match="before delimiter"):  # pydicom says so, twice
        want = rawds.decode_dataset(cut, inst.transfer_syntax)
        got = pixelview.read(cut, inst.transfer_syntax)
    assert [(e.tag, _value(e.value)) for e in got] == [(e.tag, _value(e.value)) for e in want]


def test_an_instance_without_pixel_data_is_read_whole() -> None:
    ds = rawds.decode_dataset(CASES["1.2.9.8"][0].data, "1.2.840.10008.1.2")
    del ds.PixelData
    data = rawds.encode_dataset(ds, "1.2.840.10008.1.2")
    inst = EncodedInstance("1.2.3", "1.2.4", "1.2.840.10008.1.2", data)
    got = pixelview.read(inst.data, inst.transfer_syntax)
    assert [e.tag for e in got] == [e.tag for e in ds]


@pytest.mark.parametrize(("written", "labelled"), [(ELE, ILE), (ILE, ELE)])
def test_a_dataset_in_the_other_vr_encoding_than_its_syntax_says_is_read_as_pydicom_reads_it(
    written: str, labelled: str
) -> None:
    """pydicom reads explicit VRs sent as implicit (and the reverse) by what it finds; the
    Pixel Data header read as the syntax says took `OW` and two pad bytes for its length:
    a 22,351-byte Pixel Data starting with its own length field (served as bulk data)."""
    ds = rawds.decode_dataset(CASES["1.2.9.8"][0].data, ILE)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 256, 256, 1
    ds.PixelData = np.arange(256 * 256, dtype="<u2").tobytes()
    data = rawds.encode_dataset(ds, written)
    with pytest.warns(UserWarning, match="Expected"):  # pydicom says so
        want = rawds.decode_dataset(data, labelled)
        got = pixelview.read(data, labelled)
    assert [(e.tag, e.VR) for e in got] == [(e.tag, e.VR) for e in want]
    for mine, theirs in zip(got, want, strict=True):
        assert _value(mine.value) == _value(theirs.value), mine.tag
    assert isinstance(got.PixelData, memoryview) and got.PixelData.obj is data
