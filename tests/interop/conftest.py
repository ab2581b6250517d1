"""Fixtures local to the interop suite (the shared ones come from ``harness.fixtures``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness.samples import SampleSeries, write_ct_series


@pytest.fixture
def ct_series(tmp_path: Path) -> SampleSeries:
    """Five small CT instances of one series, on disk in the test's tmp dir."""
    return write_ct_series(tmp_path / "series", 5)
