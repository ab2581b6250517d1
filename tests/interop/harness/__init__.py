"""Test harness for real third-party DICOM software: Orthanc and DCMTK in namespaces.

See tests/interop/README.md. Nothing here imports pydicom at import time.
"""

from . import dcmtk
from .dcmtk import DicomNode, FindResult, RetrieveResult, StoreSCP, ToolError, ToolResult
from .netns import NetNS
from .orthanc import Modality, Orthanc, OrthancError, run_orthanc
from .samples import SampleSeries, fingerprint, write_ct_series
from .tools import HarnessError, in_ci, require_root, require_tools, tool_env, unavailable

__all__ = [
    "DicomNode",
    "FindResult",
    "HarnessError",
    "Modality",
    "NetNS",
    "Orthanc",
    "OrthancError",
    "RetrieveResult",
    "SampleSeries",
    "StoreSCP",
    "ToolError",
    "ToolResult",
    "dcmtk",
    "fingerprint",
    "in_ci",
    "require_root",
    "require_tools",
    "run_orthanc",
    "tool_env",
    "unavailable",
    "write_ct_series",
]
