"""pyproject.toml stays in the form the build backend accepts without a deprecation warning.

setuptools >= 77 warns on `project.license` as a table ({text = ...}) and wants an SPDX
expression (or `license-files`); a proprietary licence is spelt `LicenseRef-...`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_expression_for_a_setuptools_that_takes_one() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    license_ = data["project"]["license"]
    assert isinstance(license_, str), "a table is deprecated: use an SPDX expression"
    assert re.fullmatch(r"LicenseRef-[A-Za-z0-9.-]+|[A-Za-z0-9.+-]+", license_), license_
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))
    [setuptools] = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools.replace(" ", ""))
    assert match and int(match.group(1)) >= 77, setuptools  # SPDX strings need 77+
