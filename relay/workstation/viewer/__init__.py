"""The OHIF web viewer: fetched at set-up (install), served by the workstation (site)."""
