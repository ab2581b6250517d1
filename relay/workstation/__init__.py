"""The workstation: holds the device identity, keeps one TLS link to a gateway, and presents
a loopback DICOM node and local port forwards so that any viewer works unchanged.
"""
