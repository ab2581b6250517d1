"""The viewer's keys in the workstation's `dicomweb:` section.

dicomweb:
  viewer: true          # serve OHIF at / (default true)
  viewer_dir: DIR       # where `relay viewer install --dir DIR` put it
                        # (default: the platform's data dir, per version)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relay.ops.config import Reader
from relay.workstation.viewer.install import default_viewer_dir

__all__ = ["ViewerConfig", "read_viewer"]


@dataclass(frozen=True)
class ViewerConfig:
    enabled: bool = True
    dir: Path | None = None  # None: default_viewer_dir()

    @property
    def dist(self) -> Path:
        return self.dir if self.dir is not None else default_viewer_dir()


def read_viewer(section: Reader) -> ViewerConfig:
    """`viewer` and `viewer_dir` of a `dicomweb:` section (relative to the config file)."""
    enabled = section.boolean("viewer", True)
    directory = section.path("viewer_dir") if section.has("viewer_dir") else None
    return ViewerConfig(enabled=enabled, dir=directory)
