"""The OHIF web viewer: fetched at set-up (install), served by the workstation (site).

`add_routes(app, config)` is what relay.workstation.dicomweb calls (`viewer_routes`) when
`dicomweb.viewer` is true: the viewer at `/` of the DICOMweb listener, its app-config
pointing at the same listener's DICOMweb, and a viewer URL naming a study starts fetching
it while the viewer boots (warmup). Imports are lazy: `relay viewer install` needs none
of the web server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from relay.workstation.dicomweb.settings import DicomwebConfig

__all__ = ["add_routes"]


def add_routes(app: web.Application, config: DicomwebConfig) -> None:
    """Serve the installed viewer (or the page saying how to install it) at `/`."""
    from relay.workstation.dicomweb.app import KEY_SERVICE, PREFIX, DicomwebService
    from relay.workstation.viewer.settings import viewer_config
    from relay.workstation.viewer.site import ViewerSite
    from relay.workstation.viewer.warmup import KEY_WARMUP, Warmup

    viewer = viewer_config(config)
    if not viewer.enabled:
        return
    service = app.get(KEY_SERVICE)
    on_open = None
    if isinstance(service, DicomwebService):
        warmup = Warmup(service)
        app[KEY_WARMUP] = warmup
        app.on_shutdown.append(warmup.close)

        def on_open(request: web.Request) -> None:
            warmup.open(request.query, request.headers.get("Sec-Fetch-Site"))

    options = None
    if viewer.progressive:
        from relay.workstation.viewer.progressive import stack_retrieve_options

        options = {"stackRetrieveOptions": stack_retrieve_options()}
    ViewerSite(viewer.dist, prefix=PREFIX, options=options, on_open=on_open).add_routes(app)
