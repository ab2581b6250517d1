"""`os.replace` that rides out Windows' transient refusals.

On Windows, an antivirus scanner or the search indexer opens a file that was just
written, without sharing delete, for a moment; renaming over it (or renaming it) then
fails with PermissionError (access denied, sharing violation) although a retry a few
milliseconds later succeeds. Failing there would drop a fetched instance from the study
cache or abort a viewer install for nothing, so on Windows a PermissionError is retried
for about a second. Elsewhere a rename is never refused that way: one attempt, as
`os.replace`.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["RETRY_FOR", "replace"]

RETRY_FOR = 1.0  # seconds: longer than a scanner's look at a fresh file, short for a user
_FIRST_PAUSE = 0.02
_LONGEST_PAUSE = 0.2


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """`os.replace(src, dst)`; on Windows, retried while it raises PermissionError, for
    about RETRY_FOR seconds, then that error."""
    if sys.platform != "win32":
        os.replace(src, dst)
        return
    deadline = time.monotonic() + RETRY_FOR
    pause = _FIRST_PAUSE
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE)
