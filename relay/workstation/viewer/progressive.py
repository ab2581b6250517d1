"""OHIF's retrieve configuration for progressive frames over our DICOMweb (issue 14).

OHIF 3.13.2 reads `stackRetrieveOptions` from the active data source's configuration
(extensions/cornerstone, onModeEnter) and hands it to cornerstone's
`imageRetrieveMetadataProvider` for stack viewports (its default: one `streaming` stage).
Ours has two stages, cornerstone's `sequentialRetrieve` pair:

1. `singleFast`: `rangeIndex: 0` makes cornerstone's loader (dicom-image-loader,
   rangeRequest.js) ask for `Range: bytes=0-(CHUNK_SIZE-1)` and decode that prefix at a
   lower resolution (decodeLevel from the share of `Content-Range`'s total it has): the
   first, lossy image;
2. `singleFinal`: `rangeIndex: -1` asks for `bytes=N-` (the rest), appends it and
   decodes the whole: the lossless image. It is not asked when the first range was
   already the whole frame.

The loader always sends `Accept: multipart/related; type=application/octet-stream;
transfer-syntax=*`, so HTJ2K is asked for by the `accept` query parameter (PS3.18
8.3.3.1), with the multipart native answer as the fallback the server picks for what it
cannot encode (stored compressed, unusual pixel formats): cornerstone reads such a 200
whole and is done in one request. Both stages use the same URL, which cornerstone needs
to append the second range to the first. `default` (what OHIF's prefetcher uses) is the
whole codestream in one request. The server side is relay.workstation.dicomweb
(byterange.py, codestreams.py).
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

__all__ = ["ACCEPT", "CHUNK_SIZE", "stack_retrieve_options"]

# ~9% of a 512x512 16-bit CT slice's lossless codestream (~180 KB): the 256x256 image
# from it (decodeLevel 1); a smaller chunk gives 128x128 sooner
CHUNK_SIZE: Final = 16 * 1024
ACCEPT: Final = 'image/jphc, multipart/related; type="application/octet-stream"; transfer-syntax=*'
URL_ARGUMENTS: Final = "accept=" + quote(ACCEPT, safe="")


def stack_retrieve_options(chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """The data source's `stackRetrieveOptions` (an immutability-helper `$set`)."""
    final = {"rangeIndex": -1, "urlArguments": URL_ARGUMENTS}
    return {
        "$set": {
            "stages": [
                {"id": "lossyFirst", "retrieveType": "singleFast"},
                {"id": "lossless", "retrieveType": "singleFinal"},
            ],
            "retrieveOptions": {
                "singleFast": {
                    "rangeIndex": 0,
                    "chunkSize": chunk_size,
                    "urlArguments": URL_ARGUMENTS,
                },
                "singleFinal": final,
                "default": final,
            },
        }
    }
