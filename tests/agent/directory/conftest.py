"""Directory settings that point at the slapd of the test (tests/agent/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relay.agent.directory import DirectorySettings, read_directory_settings
from relay.ops.config import Reader
from tests.interop.harness.slapd import (
    ADMIN_GROUP,
    GROUP,
    PEOPLE,
    SERVICE_DN,
    SERVICE_PW,
    Slapd,
)


def directory_section(server: Slapd, tmp_path: Path, **overrides: object) -> dict[str, object]:
    """The `directory:` mapping of an agent config for `server` (StartTLS)."""
    password_file = tmp_path / "directory.pw"
    password_file.write_text(SERVICE_PW + "\n")
    section: dict[str, object] = {
        "url": server.url,
        "start_tls": True,
        "ca": str(server.tls.ca),
        "bind_dn": SERVICE_DN,
        "bind_password_file": str(password_file),
        "user_base": PEOPLE,
        "user_filter": "(uid={user})",
        "group": GROUP,
        "admin_group": ADMIN_GROUP,
        "disabled_filter": "(pwdAccountLockedTime=*)",
        "recheck_interval": "1s",
        "timeout": "5s",
    }
    section.update(overrides)
    return {k: v for k, v in section.items() if v is not None}


def read_settings(section: dict[str, object], tmp_path: Path) -> DirectorySettings:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"directory": section}))
    reader = Reader.document(yaml.safe_load(path.read_text()), path)
    settings = read_directory_settings(reader)
    reader.done()
    assert settings is not None
    return settings


@pytest.fixture
def settings(slapd: Slapd, tmp_path: Path) -> DirectorySettings:
    return read_settings(directory_section(slapd, tmp_path), tmp_path)
