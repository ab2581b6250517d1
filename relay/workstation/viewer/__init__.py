"""The OHIF web viewer: fetched at set-up (install), served by the workstation (site).

`add_routes(app, config)` is what relay.workstation.dicomweb calls (`viewer_routes`) when
`dicomweb.viewer` is true: the viewer at `/` of the DICOMweb listener, its app-config
pointing at the same listener's DICOMweb. Imports are lazy: `relay viewer install` needs
none of the web server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from relay.workstation.dicomweb.settings import DicomwebConfig

__all__ = ["add_routes"]


def add_routes(app: web.Application, config: DicomwebConfig) -> None:
    """Serve the installed viewer (or the page saying how to install it) at `/`."""
    from relay.workstation.dicomweb.app import PREFIX
    from relay.workstation.viewer.settings import viewer_config
    from relay.workstation.viewer.site import ViewerSite

    viewer = viewer_config(config)
    if viewer.enabled:
        ViewerSite(viewer.dist, prefix=PREFIX).add_routes(app)
