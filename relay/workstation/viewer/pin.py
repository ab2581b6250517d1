"""The OHIF viewer release the workstation serves, pinned by version and by hash.

The built `dist/` of the npm package `@ohif/app` is fetched at set-up (`relay viewer
install`), never committed. The integrity string is npm's `dist.integrity` (an SRI sha512
of the tarball): a tarball that does not match it is refused, whoever served it.
Upgrading: `npm view @ohif/app@VERSION dist` gives the tarball and integrity; check that
the tarball still ships `package/dist/index.html`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OHIF", "ViewerRelease"]


@dataclass(frozen=True)
class ViewerRelease:
    name: str
    version: str
    tarball: str
    integrity: str  # "sha512-<base64>", as npm's dist.integrity


OHIF = ViewerRelease(
    name="@ohif/app",
    version="3.13.2",
    tarball="https://registry.npmjs.org/@ohif/app/-/app-3.13.2.tgz",
    integrity=(
        "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
    ),
)
