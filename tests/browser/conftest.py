"""Where the browser tests find the viewer `relay viewer install` put in place.

Read at import, before tests/conftest.py points XDG_DATA_HOME at a temporary directory
for the session: the viewer lives in the real user's data dir (`make install` and
`make test` install it there). RELAY_VIEWER_DIR overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from relay.workstation.viewer.install import default_viewer_dir

VIEWER_DIR = Path(os.environ.get("RELAY_VIEWER_DIR") or default_viewer_dir())
