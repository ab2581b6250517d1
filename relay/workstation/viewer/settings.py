"""The viewer's keys, read with the rest of the workstation's `dicomweb:` section.

dicomweb:
  viewer: true          # serve OHIF at / (default true)
  viewer_dir: DIR       # where `relay viewer install --dir DIR` put it
                        # (default: the platform's data dir, per version)
  progressive: false    # true: a lower-resolution first image from an HTJ2K byte
                        # range, then the lossless rest (viewer/progressive.py)

relay.workstation.dicomweb.settings reads these keys (its reader rejects unknown keys);
this turns them into where the dist is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.viewer.install import default_viewer_dir

__all__ = ["ViewerConfig", "viewer_config"]


@dataclass(frozen=True)
class ViewerConfig:
    enabled: bool = True
    dir: Path | None = None  # None: default_viewer_dir()
    progressive: bool = False

    @property
    def dist(self) -> Path:
        return self.dir if self.dir is not None else default_viewer_dir()


def viewer_config(dicomweb: DicomwebConfig) -> ViewerConfig:
    """The viewer part of a `dicomweb:` section."""
    return ViewerConfig(enabled=dicomweb.viewer, dir=dicomweb.viewer_dir,
                        progressive=dicomweb.progressive)  # fmt: skip
