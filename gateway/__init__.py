"""The DMZ gateway: authenticates links and splices opaque streams between devices and agents.

It never writes files, never logs payload, and never imports DICOM or compression code.
"""
