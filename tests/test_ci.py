""".ci/run installs and checks every program a test needs, so CI=true cannot fail on a
tool that CI forgot (or pass on one that it skipped).

The programs are those named in `require_tools(...)` calls anywhere under tests/, the
DCMTK tools (the harness passes their names at run time) and `ip` (require_root).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.interop.harness.tools import INSTALL_HINTS

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"
DCMTK = {"echoscu", "findscu", "getscu", "movescu", "storescu", "storescp"}
#: Installed by .ci/run only when no kubectl is there (Debian's conflicts with others).
CONDITIONAL = {"kubernetes-client"}


def bash_array(name: str) -> set[str]:
    """The words of `NAME=( ... )` in .ci/run (comments dropped)."""
    match = re.search(rf"^{name}=\((.*?)^\)", CI_RUN.read_text(), re.S | re.M)
    assert match, f"{name}=( ... ) not found in {CI_RUN}"
    return {w for line in match.group(1).splitlines() for w in line.split("#")[0].split()}


def required_tools() -> set[str]:
    """Every literal name passed to require_tools() under tests/."""
    names = {"ip"} | DCMTK
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name == "test_harness.py":  # tests require_tools itself, with made-up names
            continue
        for call in re.findall(r"require_tools\(([^)]*)\)", path.read_text()):
            names.update(re.findall(r"""["']([^"']+)["']""", call))
    return names


def test_ci_checks_every_tool_a_test_requires() -> None:
    tools = required_tools()
    assert {"kubectl", "prometheus", "promtool", "Orthanc"} <= tools  # the scan finds them
    assert tools <= bash_array("TOOLS"), tools - bash_array("TOOLS")


def test_ci_installs_the_package_of_every_tool() -> None:
    packages = bash_array("PACKAGES")
    for tool in bash_array("TOOLS"):
        hint = INSTALL_HINTS.get(tool)
        assert hint, f"{tool}: no install hint in interop/harness/tools.py"
        package = hint.rsplit("apt-get install ", 1)[1].split()[0]
        assert package in packages | CONDITIONAL, (tool, package)
    text = CI_RUN.read_text()
    assert "command -v kubectl" in text and "kubernetes-client" in text


def test_ci_installs_what_later_issues_need() -> None:
    later = {"orthanc-dicomweb", "slapd", "ldap-utils", "chromium", "chromium-driver", "stunnel4"}
    assert later <= bash_array("PACKAGES")


def test_ci_runs_the_test_command_readme_gives() -> None:
    """CI runs exactly `make test` (README's command), under `set -e`, as its last step: any
    failure, including pytest's "no tests collected" (exit 5, which make turns into 2), fails CI."""
    text = CI_RUN.read_text()
    assert "set -euo pipefail" in text
    commands = [line for line in text.splitlines() if line and not line.startswith((" ", "#", "}"))]
    assert commands[-1].startswith("make test"), commands[-1]
    readme = (CI_RUN.parents[1] / "README.md").read_text()
    assert "make test" in readme
