"""pytest fixtures for real third-party DICOM software (a plugin: see tests/conftest.py).

Loaded for the whole test tree, so any test can ask for ``netns``, ``orthanc`` or
``orthanc_module``. Importing this module starts nothing and imports no pydicom.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns import NetNS
from .orthanc import Orthanc, run_orthanc


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """A fresh network namespace with only ``lo``; deleted after the test."""
    with NetNS() as ns:
        yield ns


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc per test module, in its own namespace (start-up costs ~1 s)."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def orthanc(orthanc_module: Orthanc) -> Orthanc:
    """The module's Orthanc, running and emptied: no instances, only configured modalities.

    A test may stop it (e.g. to play "PACS down"): the next one gets it restarted.
    """
    if not orthanc_module.running:
        orthanc_module.start()
    orthanc_module.reset()
    return orthanc_module
