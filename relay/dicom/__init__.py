"""DICOM through the relay: both ends, and what they share.

The ends: `node` is the workstation's local DICOM node (pynetdicom SCP) with `session`
(one request's stream, on the loop) and `move_check` (C-MOVE destinations checked first);
`agent` serves one stream against the PACS with `pacs_ops` (the pynetdicom SCU thread)
and `intake` (instances from the PACS, and the C-MOVE receiver); `pacs_target` holds the
`pacs:` settings and `pacs_echo` is the agent's readiness check. Shared: `codec` (the
messages on a stream, no pydicom), `bridge` (the bounded thread/loop channel), `rawds`,
`contexts`, `stats`, `status`, and `offer` (the pixel codecs a workstation announces).
Every module calls only the ones below it (docs/internals/dicom.md; tests/dicom/test_path.py
checks it). pynetdicom and pydicom are imported only by the modules that need them, so
importing `relay.dicom.codec` stays light.
"""
