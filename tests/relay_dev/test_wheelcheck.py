"""relay_dev.wheelcheck: which wheels a target installs (offline), and the real index.

The `interop` tests ask PyPI's JSON API: without network they skip here and fail in CI
(CI=true), like every interop test.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from relay_dev import wheelcheck
from relay_dev.wheelcheck import TARGETS, Project, Target, newest_with_wheel, supports

ROOT = Path(__file__).resolve().parents[2]


def target(name: str, python: tuple[int, int]) -> Target:
    (found,) = [t for t in TARGETS if t.name == name and t.python == python]
    return found


WIN311, WIN313 = target("win_amd64", (3, 11)), target("win_amd64", (3, 13))
ARM312, INTEL312 = target("macos_arm64", (3, 12)), target("macos_x86_64", (3, 12))


def test_every_platform_and_python_is_a_target() -> None:
    assert {str(t) for t in TARGETS} == {
        f"{p}/cp3{v}" for p in ("win_amd64", "macos_arm64", "macos_x86_64") for v in (11, 12, 13)
    }


def test_pure_python_wheels_fit_everywhere_and_sdists_nowhere() -> None:
    for t in TARGETS:
        assert supports(["attrs-26.1.0-py3-none-any.whl"], t)
        assert not supports(["attrs-26.1.0.tar.gz"], t)


def test_platform_wheels() -> None:
    win = ["x-1.0-cp311-cp311-win_amd64.whl"]
    assert supports(win, WIN311) and not supports(win, WIN313)
    assert not supports(win, ARM312)
    assert supports(["x-1.0-cp39-abi3-win_amd64.whl"], WIN313)  # the stable ABI
    assert not supports(["x-1.0-cp311-cp311-win32.whl"], WIN311)
    arm = ["x-1.0-cp312-cp312-macosx_11_0_arm64.whl"]
    assert supports(arm, ARM312) and not supports(arm, INTEL312)
    universal = ["x-1.0-cp312-cp312-macosx_10_9_universal2.whl"]
    assert supports(universal, ARM312) and supports(universal, INTEL312)
    assert not supports(["x-1.0-cp312-cp312-macosx_14_0_x86_64.whl"], INTEL312)  # too new


def test_markers_are_evaluated_per_target() -> None:
    uvloop = ["uvloop>=0.19; sys_platform != 'win32'", "colorama; platform_system == 'Windows'"]
    assert [r.name for r in wheelcheck._wanted(uvloop, WIN311.environment())] == ["colorama"]
    assert [r.name for r in wheelcheck._wanted(uvloop, ARM312.environment())] == ["uvloop"]
    old = ["async-timeout; python_version < '3.11'"]
    assert wheelcheck._wanted(old, WIN311.environment()) == []


def test_the_newest_allowed_release_with_a_wheel() -> None:
    project = Project(
        "x",
        "3.0",
        {
            "3.0": ("x-3.0.tar.gz", "x-3.0-cp39-abi3-macosx_11_0_arm64.whl"),
            "2.1": ("x-2.1-cp39-abi3-macosx_10_12_x86_64.whl",),
            "2.0": ("x-2.0-cp39-abi3-macosx_10_12_x86_64.whl",),
            "4.0rc1": ("x-4.0rc1-py3-none-any.whl",),
        },
        (),
    )
    assert newest_with_wheel(project, SpecifierSet(">=2"), INTEL312) == "2.1"
    assert newest_with_wheel(project, SpecifierSet("<2.1"), INTEL312) == "2.0"
    assert newest_with_wheel(project, SpecifierSet(">=3"), INTEL312) is None
    assert newest_with_wheel(project, SpecifierSet(">=3"), WIN311) is None


def _index_or_skip() -> None:
    try:
        wheelcheck.fetch_json(f"{wheelcheck.INDEX}/pip/json")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        from tests.interop.harness.tools import unavailable

        unavailable(f"the package index is not reachable: {exc}")


@pytest.mark.interop
def test_every_dependency_has_wheels_for_windows_and_macos() -> None:
    _index_or_skip()
    done = subprocess.run(
        [sys.executable, "-m", "relay_dev.wheelcheck"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all " in done.stdout and "dependencies have wheels for" in done.stdout
    for line in done.stdout.splitlines()[:-1]:
        assert "MISSING" not in line, line


@pytest.mark.interop
def test_the_check_sees_what_windows_lacks() -> None:
    """uvloop has no Windows wheel (why pyproject leaves it out there): the check knows."""
    _index_or_skip()
    project = wheelcheck.project_of("uvloop", wheelcheck.fetch_json)
    assert newest_with_wheel(project, SpecifierSet(">=0.19"), WIN311) is None
    assert newest_with_wheel(project, SpecifierSet(">=0.19"), ARM312) is not None
