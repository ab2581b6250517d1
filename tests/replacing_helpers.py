"""Windows' transient refusal of a rename, for tests of code that replaces fresh files."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest


def scanner_holds_each_fresh_file_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Look like Windows with an antivirus scanner: the first os.replace of each source
    file raises PermissionError (the scanner has it open without sharing delete), the
    next one works. Returns the sources refused so far."""
    monkeypatch.setattr(sys, "platform", "win32")
    real: Callable[..., None] = os.replace
    refused: list[str] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(src) not in refused:
            refused.append(str(src))
            raise PermissionError(32, "The process cannot access the file", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return refused
