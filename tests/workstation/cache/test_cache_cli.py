"""`relay cache status` output (relay/workstation/cache/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SHOW = """
from relay.workstation.cache import cli
study = {"label": "study 1", "modalities": "CT", "state": "complete", "instances": 1,
         "expected": 1, "bytes": 1, "age_s": 5, "source": "rule",
         "patient": "Yamada^Tarou=\\u5c71\\u7530^\\u592a\\u90ce", "description": "CT"}
cli._render({"bytes": 1, "max_bytes": 2, "queued": 0, "studies": [study]}, names=True)
"""


def test_names_outside_the_code_page_do_not_fail_the_listing() -> None:
    """Windows, output redirected to a file: stdout is cp1252, a Japanese name is not."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", SHOW], capture_output=True, env=env, cwd=ROOT, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = done.stdout.decode("cp1252")
    assert "Yamada^Tarou=" in out and "study 1 CT" in out
