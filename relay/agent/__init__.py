"""The agent: runs inside the hospital, dials out to every gateway, talks DICOM to the PACS,
serves the TCP services it allows, holds the site CA, the device registry and the audit trail.
"""
