"""Original dataset bytes through pynetdicom, and the structural check of datasets."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as s
from pynetdicom import build_context

from relay.dicom import rawds
from relay.dicom.rawds import encode_dataset
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from relay_dev.samples import make_study

from .helpers import EXPLICIT, IMPLICIT, capturing_scp, implicit_instance, quirky_instance, scu

rawds.install()


def test_the_quirky_instance_would_change_if_pydicom_re_encoded_it() -> None:
    """Precondition of the byte-identity tests: re-encoding is not the identity here."""
    inst = quirky_instance()
    rawds.check_dataset(inst.data, EXPLICIT)
    again = encode_dataset(rawds.decode_dataset(inst.data, EXPLICIT), EXPLICIT)
    assert again != inst.data


def test_send_c_store_sends_the_original_bytes() -> None:
    inst = quirky_instance()
    with capturing_scp() as (captured, port):
        assoc = scu().associate(
            "127.0.0.1", port, contexts=[build_context(inst.sop_class, [EXPLICIT])]
        )
        assert assoc.is_established
        ds = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, EXPLICIT, inst.data)
        status = assoc.send_c_store(ds)
        assoc.release()
    assert status.Status == 0
    assert captured.by_uid()[inst.sop_instance] == (EXPLICIT, inst.data)


def test_c_get_from_the_embedded_pacs_returns_the_stored_bytes() -> None:
    inst = quirky_instance()
    with EmbeddedPacs(MemoryStore([inst])) as pacs:
        got: dict[str, bytes] = {}

        def on_store(event: object) -> int:
            req = event.request  # type: ignore[attr-defined]
            got[str(req.AffectedSOPInstanceUID)] = req.DataSet.getvalue()
            return 0

        from pynetdicom import build_role, evt

        from relay.dicom.contexts import MODELS

        model = MODELS[("study", "get")]
        assoc = scu().associate(
            "127.0.0.1",
            pacs.port,
            contexts=[build_context(model), build_context(inst.sop_class, [EXPLICIT])],
            ae_title=pacs.ae_title,
            ext_neg=[build_role(inst.sop_class, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        from .helpers import query

        ident = query(
            "STUDY",
            StudyInstanceUID=str(rawds.decode_dataset(inst.data, EXPLICIT).StudyInstanceUID),
        )
        statuses = [int(st.Status) for st, _ in assoc.send_c_get(ident, model)]
        assoc.release()
    assert statuses[-1] == 0
    assert got == {inst.sop_instance: inst.data}


def test_convertible_context_gets_a_correct_re_encoding() -> None:
    """A peer that only takes explicit VR gets the implicit VR dataset converted, correctly."""
    inst = implicit_instance()
    with capturing_scp(syntaxes=[EXPLICIT]) as (captured, port):
        assoc = scu().associate(
            "127.0.0.1", port, contexts=[build_context(inst.sop_class, [EXPLICIT])]
        )
        ds = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, IMPLICIT, inst.data)
        status = assoc.send_c_store(ds)
        assoc.release()
    assert status.Status == 0
    ts, data = captured.by_uid()[inst.sop_instance]
    assert ts == EXPLICIT
    assert data != inst.data
    assert rawds.decode_dataset(data, EXPLICIT) == rawds.decode_dataset(inst.data, IMPLICIT)


def test_other_datasets_still_go_through_pynetdicom_encoding() -> None:
    inst = make_study(1, rows=16, cols=16)[0]
    ds = rawds.decode_dataset(inst.data, EXPLICIT)
    ds.file_meta = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, EXPLICIT, b"").file_meta
    with capturing_scp() as (captured, port):
        assoc = scu().associate(
            "127.0.0.1", port, contexts=[build_context(inst.sop_class, [EXPLICIT])]
        )
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    assert rawds.decode_dataset(captured.by_uid()[inst.sop_instance][1], EXPLICIT) == ds


def test_install_is_idempotent() -> None:
    rawds.install()
    rawds.install()
    import pynetdicom.association

    assert pynetdicom.association.encode is rawds._encode_hook  # type: ignore[attr-defined]
    assert rawds._original_encode is not rawds._encode_hook


# -- structural check ------------------------------------------------------------------


def test_samples_and_quirky_datasets_pass() -> None:
    for inst in [*make_study(2, rows=16, cols=16), *make_study(2, modality="MR", rows=8, cols=8)]:
        seen = rawds.check_dataset(inst.data, inst.transfer_syntax)
        assert seen == {"sop_class": inst.sop_class, "sop_instance": inst.sop_instance}
    q = quirky_instance()
    rawds.check_instance(q.data, EXPLICIT, q.sop_class, q.sop_instance)
    i = implicit_instance()
    rawds.check_instance(i.data, IMPLICIT, i.sop_class, i.sop_instance)


def test_encapsulated_pixel_data_passes() -> None:
    base = make_study(1, rows=8, cols=8)[0].data
    cut = base.index(struct.pack("<HH", 0x7FE0, 0x0010))
    frags = struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # empty basic offset table
    frags += struct.pack("<HHI", 0xFFFE, 0xE000, 6) + b"\xff\xd8abcd"
    frags += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    data = base[:cut] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + frags
    rawds.check_dataset(data, "1.2.840.10008.1.2.4.50")
    with pytest.raises(rawds.MalformedDataset, match="delimiter"):
        rawds.check_dataset(data[:-8], "1.2.840.10008.1.2.4.50")


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d[:-100], "runs past the end"),
        (lambda d: d + b"\x00\x00\x00", "stray bytes"),
        (lambda d: d[:4] + b"z1" + d[6:], "bad VR"),
        (lambda d: b"", "empty"),
        (lambda d: struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + d, "outside an item"),
        (
            lambda d: struct.pack("<HH2sHI", 0x0008, 0x1111, b"SQ", 0, 0xFFFFFFFF) + d,
            "expected an item",
        ),
    ],
)
def test_malformed_datasets_are_refused(mutate: object, why: str) -> None:
    data = make_study(1, rows=16, cols=16)[0].data
    with pytest.raises(rawds.MalformedDataset, match=why):
        rawds.check_dataset(mutate(data), EXPLICIT)  # type: ignore[operator]


def test_sop_uids_must_match_the_command() -> None:
    inst = make_study(1, rows=8, cols=8)[0]
    with pytest.raises(rawds.MalformedDataset, match="sop_instance"):
        rawds.check_instance(inst.data, EXPLICIT, inst.sop_class, "1.2.3")


def test_nesting_is_bounded() -> None:
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    seq_start = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    data = (seq_start + item_start) * 40
    with pytest.raises(rawds.MalformedDataset, match="nested"):
        rawds.check_dataset(data, EXPLICIT)


def test_deflated_datasets_are_inflated_with_a_bound() -> None:
    import zlib

    inst = make_study(1, rows=16, cols=16)[0]
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(inst.data) + c.flush()
    rawds.check_dataset(deflated, "1.2.840.10008.1.2.1.99")
    with pytest.raises(rawds.MalformedDataset, match="larger"):
        rawds.check_dataset(deflated, "1.2.840.10008.1.2.1.99", max_inflated=1000)
    with pytest.raises(rawds.MalformedDataset, match="deflate"):
        rawds.check_dataset(b"\xff" * 50, "1.2.840.10008.1.2.1.99")


def test_readable_inflates_a_deflated_dataset_once_within_its_bound() -> None:
    """What the agent checks and decodes from one inflate (it inflated twice, up to
    1 GiB each, whatever its limits)."""
    import zlib

    inst = make_study(1, rows=16, cols=16)[0]
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(inst.data) + c.flush()
    data, ts = rawds.readable(deflated, "1.2.840.10008.1.2.1.99", len(inst.data))
    assert (data, ts) == (inst.data, EXPLICIT)
    assert rawds.readable(inst.data, EXPLICIT, 10) == (inst.data, EXPLICIT)  # as it is
    with pytest.raises(rawds.InflatedTooLarge):
        rawds.readable(deflated, "1.2.840.10008.1.2.1.99", len(inst.data) - 1)
    with pytest.raises(rawds.MalformedDataset, match="deflate"):
        rawds.readable(b"\xff" * 50, "1.2.840.10008.1.2.1.99", 1000)


_VALID = quirky_instance().data


@given(s.integers(0, len(_VALID) - 1))
@settings(max_examples=300)
def test_any_truncation_is_refused_or_ends_on_an_element(cut: int) -> None:
    try:
        rawds.check_dataset(_VALID[:cut], EXPLICIT)
    except rawds.MalformedDataset:
        return
    # Accepted: it must then parse as a dataset with pydicom, and be a prefix by elements.
    assert len(rawds.decode_dataset(_VALID[:cut], EXPLICIT)) >= 1


@given(s.binary(max_size=400), s.sampled_from([EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.2"]))
@settings(max_examples=500)
def test_random_bytes_only_ever_raise_malformed(data: bytes, ts: str) -> None:
    with contextlib.suppress(rawds.MalformedDataset):
        rawds.check_dataset(data, ts)
