"""DICOM through the relay: what the agent and the workstation share.

`codec` is the message layer on a stream (no pydicom); `agent` serves one stream against the
PACS; `node` is the workstation's local DICOM node; `embedded_pacs` and `samples` are for the
demo and tests. pynetdicom and pydicom are imported only inside this package, and only by
the modules that need them, so importing `relay.dicom.codec` stays light.
"""
