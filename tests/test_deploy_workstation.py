"""deploy/workstation/ (running at login on each platform), deploy/windows/ (the single-file
build), the hosted workflow, and `relay workstation --log-file` that the Windows task uses."""

from __future__ import annotations

import ast
import plistlib
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from relay.workstation.service import EXIT_REVOKED
from tests.test_deploy import DEPLOY, parse_unit, single

ROOT = Path(__file__).resolve().parents[1]
WS = ROOT / "deploy" / "workstation"
README = (ROOT / "README.md").read_text()
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
DRAIN_GRACE_DEFAULT = 30  # seconds; every stop timeout must exceed it


def test_systemd_user_unit() -> None:
    unit = parse_unit(WS / "relay-workstation.service")
    service = unit["Service"]
    argv = shlex.split(single(service, "ExecStart"))
    assert argv[0] == "%h/.local/bin/relay"
    assert argv[1:] == ["workstation", "--config", "%E/dmz-relay/workstation.yaml"]
    reload = shlex.split(single(service, "ExecReload"))
    assert reload[1:] == ["workstation", "reload", "--config", "%E/dmz-relay/workstation.yaml"]
    assert single(service, "KillSignal") == "SIGTERM"
    assert int(single(service, "TimeoutStopSec").rstrip("s")) > DRAIN_GRACE_DEFAULT
    assert single(unit["Install"], "WantedBy") == "default.target"  # at login
    assert "User" not in dict(service)  # a user unit runs as its user


@pytest.mark.parametrize(
    "unit", [WS / "relay-workstation.service", DEPLOY / "systemd" / "relay-workstation.service"]
)
def test_systemd_units_do_not_restart_a_revoked_or_misconfigured_workstation(unit: Path) -> None:
    """Exit 3 (revoked) and 2 (a user error) are not fixed by restarting."""
    service = parse_unit(unit)["Service"]
    assert single(service, "Restart") == "on-failure"
    prevented = single(service, "RestartPreventExitStatus").split()
    assert {str(EXIT_REVOKED), "2"} <= set(prevented)


def test_launchd_agent() -> None:
    plist = plistlib.loads((WS / "org.dmzrelay.workstation.plist").read_bytes())
    assert plist["Label"] == "org.dmzrelay.workstation"
    argv = plist["ProgramArguments"]
    assert argv[0] == "HOME_DIR/.local/bin/relay"
    assert argv[1:3] == ["workstation", "--config"]
    assert argv[3].startswith("HOME_DIR/Library/Application Support/dmz-relay/")
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # a clean stop stays stopped
    assert plist["ExitTimeOut"] > DRAIN_GRACE_DEFAULT
    assert plist["Umask"] == 0o077
    assert "org.dmzrelay.workstation.plist" in README and "s|HOME_DIR|$HOME|g" in README


def test_windows_scheduled_task() -> None:
    task = ET.parse(WS / "relay-workstation.xml").getroot()
    assert task.find("t:Triggers/t:LogonTrigger/t:UserId", TASK_NS) is not None
    principal = task.find("t:Principals/t:Principal", TASK_NS)
    assert principal is not None
    assert principal.findtext("t:RunLevel", namespaces=TASK_NS) == "LeastPrivilege"
    assert principal.findtext("t:LogonType", namespaces=TASK_NS) == "InteractiveToken"
    settings = task.find("t:Settings", TASK_NS)
    assert settings is not None
    assert settings.findtext("t:ExecutionTimeLimit", namespaces=TASK_NS) == "PT0S"  # no limit
    assert settings.findtext("t:MultipleInstancesPolicy", namespaces=TASK_NS) == "IgnoreNew"
    assert settings.find("t:RestartOnFailure", TASK_NS) is not None
    command = task.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS)
    arguments = task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS)
    assert command == "PYTHONW"  # no console window
    assert arguments == '-m relay.cli workstation --config "CONFIG" --log-file "LOG_FILE"'


def test_the_install_script_fills_every_placeholder() -> None:
    script = (WS / "install-workstation.ps1").read_text()
    xml = (WS / "relay-workstation.xml").read_text()
    filled = set(re.findall(r'\$Xml\.Replace\("([A-Z_]+)"', script))
    assert filled == {"USER_ID", "PYTHONW", "CONFIG", "LOG_FILE"}
    assert all(name in xml for name in filled)
    assert "Register-ScheduledTask" in script and "workstation stop" in script
    assert "install-workstation.ps1" in README


def test_pyinstaller_recipe() -> None:
    spec = (ROOT / "deploy" / "windows" / "relay.spec").read_text()
    compile(spec, "relay.spec", "exec")  # a spec is Python
    assert (ROOT / "deploy" / "windows" / "relay_main.py").is_file()
    assert '("relay", True), ("relayw", False)' in spec  # console and windowless
    assert "deploy/windows/relay.spec" in README or "deploy\\windows\\relay.spec" in README


def test_the_hosted_workflow_runs_tests_that_exist() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/ends-windows-macos.yml").read_text())
    matrix = workflow["jobs"]["ends"]["strategy"]["matrix"]
    assert {"windows-latest", "macos-latest"} <= set(matrix["os"])
    assert matrix["python"] == ["3.11", "3.12", "3.13"]
    commands = " ".join(
        step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]
    )
    for path in re.findall(r"tests/\S+", commands):
        assert (ROOT / path).exists(), path
    assert "relay_dev.wheelcheck" in commands
    assert re.search(r"not run by this project's (own )?CI", README)


def test_log_file_takes_the_output_and_the_errors(tmp_path: Path) -> None:
    log = tmp_path / "ws.log"
    config = tmp_path / "ws.yaml"
    config.write_text("gateway: 127.0.0.1:1\nidentity_dir: nowhere\n")
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "workstation", "--config", str(config),
         "--log-file", str(log)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert (done.stdout, done.stderr) == ("", "")
    assert "identity_dir: device.crt not found in" in log.read_text()


def test_log_file_is_rotated_by_the_process(tmp_path: Path) -> None:
    """Windows cannot rotate a file a process holds open: the workstation does it."""
    log = tmp_path / "ws.log"
    log.write_bytes(b"{}\n" * (10 * 1024 * 1024 // 3 + 1))  # 10 MiB from earlier runs
    config = tmp_path / "ws.yaml"
    config.write_text("gateway: 127.0.0.1:1\nidentity_dir: nowhere\n")
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "workstation", "--config", str(config),
         "--log-file", str(log)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert (tmp_path / "ws.log.1").stat().st_size >= 10 * 1024 * 1024
    assert "identity_dir: device.crt not found in" in log.read_text()
    assert log.stat().st_size < 4096


def _spec_call_keyword(name: str) -> list[str]:
    """A list-of-strings keyword of the spec's Analysis(...) call."""
    tree = ast.parse((ROOT / "deploy" / "windows" / "relay.spec").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Analysis":
            for keyword in node.keywords:
                if keyword.arg == name:
                    value = ast.literal_eval(keyword.value)
                    assert isinstance(value, list)
                    return [str(v) for v in value]
    raise AssertionError(f"no {name}= in the spec's Analysis call")


CLOSURE = """
import importlib, pkgutil, sys
import relay.workstation
from relay.selfcheck import MODULES
names = ["relay.cli", "relay.selfcheck", "relay.trust.enroll", "relay.codecs.pixels", *MODULES]
names += [m.name for m in pkgutil.walk_packages(relay.workstation.__path__, "relay.workstation.")]
for name in names:
    importlib.import_module(name)
print("\\n".join(sorted({n.split(".")[0] for n, m in sys.modules.items() if m is not None})))
"""


def test_the_single_file_build_excludes_nothing_the_workstation_imports() -> None:
    """numpy was excluded: `relayw.exe workstation` with dicomweb: failed at start with
    ModuleNotFoundError, and without it the pixel codecs offered silently dropped to none."""
    excludes = set(_spec_call_keyword("excludes"))
    done = subprocess.run(
        [sys.executable, "-c", CLOSURE], capture_output=True, text=True, timeout=120,
        check=True, cwd=ROOT,
    )  # fmt: skip
    imported = set(done.stdout.split())
    assert {"relay", "numpy", "imagecodecs", "PIL", "pynetdicom"} <= imported
    assert not excludes & imported, excludes & imported
    spec = (ROOT / "deploy" / "windows" / "relay.spec").read_text()
    assert 'for package in ("imagecodecs", "PIL"):' in spec and "collect_all(package)" in spec


def test_the_built_executables_check_themselves_in_the_workflow() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/ends-windows-macos.yml").read_text())
    runs = " ".join(step.get("run", "") for step in workflow["jobs"]["single-file"]["steps"])
    assert "dist\\relay.exe self-check" in runs
    assert "relayw.exe -ArgumentList self-check" in runs


def test_self_check_passes_here() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "self-check"], capture_output=True, text=True,
        timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert "ok   import relay.workstation.dicomweb.server" in done.stdout
    assert all(f"ok   pixel codec {c}" in done.stdout for c in ("jpegls", "htj2k", "jpegxl"))
