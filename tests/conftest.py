"""Shared test policy: real third-party tools skip locally when missing, fail in CI.

``require_tools`` comes from ``interop.harness.tools``; the plugin below makes the
``netns``, ``orthanc`` and ``orthanc_module`` fixtures available to every test.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.interop.harness.tools import in_ci, require_tools

pytest_plugins = ["pytester", "tests.interop.harness.fixtures"]

__all__ = ["require_tools"]

# No property test is timed: these machines are shared and noisy, and speed is measured
# in tests/bench. Hypothesis's per-example deadline would turn load into flaky failures.
settings.register_profile(
    "relay", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("relay")


@pytest.fixture(autouse=True, scope="session")
def _users_data_dir_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Workstations started without `state_dir` keep their state in the user's data dir
    (XDG_DATA_HOME on Linux): a temporary one here, inherited by child processes."""
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """With CI=true an ``interop`` test may not skip, whatever skipped it: it fails."""
    report = yield
    if (
        report.skipped
        and in_ci()
        and item.get_closest_marker("interop") is not None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"interop test skipped while CI=true (mandatory in CI): {reason}"
    return report
