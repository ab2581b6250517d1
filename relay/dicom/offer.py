"""The pixel codecs a workstation announces to the agent, one set for every path that
receives instances: the DICOM node, the DICOMweb source and the prefetcher.

The agent sends a codec only to a stream that announced it (header ``dicom-pixels``). An
instance that does not decode exactly at the workstation (its CRC differs) takes its codec
out of the offer for the rest of the process's life: whichever end is at fault, the
instances come without it from then on. One shared offer, so that a fault seen by one
path spares the others the same failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from relay import codecs
from relay.wire import HEADER_DICOM_PIXELS

log = logging.getLogger(__name__)


class CodecOffer:
    """Thread-safe: the DICOM node's handlers run on pynetdicom's threads."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        """`names`: the codecs to announce; by default every codec this machine decodes
        (looked up on first use: a workstation without DICOM never loads imagecodecs)."""
        self._names = None if names is None else tuple(names)
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        with self._lock:
            if self._names is None:
                self._names = codecs.available()
            return self._names

    def load(self) -> None:
        """Look the codecs up now (it imports imagecodecs and numpy) rather than on the
        first request that needs them."""
        _ = self.names

    def header(self) -> dict[str, str]:
        """The stream header announcing the codecs; none when there are none."""
        names = self.names
        return {HEADER_DICOM_PIXELS: ",".join(names)} if names else {}

    def distrust(self, codec: str) -> None:
        """An instance in `codec` did not decode to the PACS's pixels here: announce it no
        more. Which end is at fault is not known; either way the codec is out."""
        names = self.names
        with self._lock:
            if codec not in names:
                return
            self._names = tuple(n for n in names if n != codec)
        log.warning("an instance's %s pixels did not decode exactly; asking for no more %s",
                    codec, codec)  # fmt: skip
