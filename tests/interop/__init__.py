"""Interop tests against real DCMTK and Orthanc; the reusable harness is ``interop.harness``."""
