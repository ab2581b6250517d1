"""DICOMweb at the workstation (DESIGN.md section 14): QIDO-RS, WADO-RS and STOW-RS on
loopback, over the same sealed session and cache as the DICOM node.

Modules, one job each: `settings` (the `dicomweb:` keys), `qido` (query parameters to a
C-FIND), `media` (Accept negotiation, multipart parts), `dicomjson` (DICOM JSON with
BulkDataURIs), `frames`, `render` (JPEG/PNG), `part10` (file meta), `guard` (Host and
Origin checks), `source` (C-FIND/retrieve/C-STORE through the relay), `retrieve` (series
flights: single-flight, bounded holding), `metrics`, `app` (routes), `server` (lifecycle).

For the viewer (and anything else served from the same origin), the contract is:

- `relay.workstation.dicomweb.app.build_app(service, extra_routes=[...])` builds one
  aiohttp `web.Application`; DICOMweb lives under `PREFIX` (`/dicom-web`); each
  `extra_routes` callable gets the application and adds its own routes (for the viewer:
  `/` and its static files). The Host/Origin guards and the metrics apply to them too.
- `DicomwebServer(config, open_stream, cache=..., extra_routes=[...])` passes them on.
- relay.workstation.service calls `viewer_routes(config)` below: when `dicomweb.viewer`
  is true and a module `relay.workstation.viewer` exists, its
  `add_routes(app: web.Application, config: DicomwebConfig) -> None` is the viewer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.workstation.dicomweb.settings import DicomwebConfig

__all__ = ["viewer_routes"]


def viewer_routes(config: DicomwebConfig) -> list[Callable[[Any], None]]:
    """The viewer's routes when `viewer: true` and the viewer module is installed."""
    if not config.viewer:
        return []
    try:
        viewer = importlib.import_module("relay.workstation.viewer")
    except ModuleNotFoundError as exc:
        if exc.name != "relay.workstation.viewer":
            raise
        return []
    add = viewer.add_routes
    return [lambda app: add(app, config)]
