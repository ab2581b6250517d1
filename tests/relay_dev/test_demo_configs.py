"""`relay demo`'s config files keep every role's state inside the demo's directory, which
the next run wipes (README: "Everything lives in ./demo-state")."""

from __future__ import annotations

from pathlib import Path

from relay.agent.config import load_agent_config
from relay.workstation.config import load_workstation_config
from relay_dev.demo import DemoPorts, write_configs, write_pki


def test_the_demo_keeps_the_workstations_state_in_its_directory(tmp_path: Path) -> None:
    """The workstation's lock, control.json and study cache included: without a
    state_dir they went to the user's data directory, never wiped."""
    ports = DemoPorts(
        gateway=18443, gateway_metrics=19101, agent_metrics=19102,
        workstation_metrics=19103, dicom=21112, pacs=21104, dicomweb=18088,
    )  # fmt: skip
    write_pki(tmp_path)
    paths = write_configs(tmp_path, ports)
    workstation = load_workstation_config(paths["workstation"])
    assert workstation.state_dir is not None and workstation.cache is not None
    assert workstation.state_dir.resolve().is_relative_to(tmp_path.resolve())
    assert workstation.cache.dir.resolve().is_relative_to(tmp_path.resolve())
    agent = load_agent_config(paths["agent"])
    assert agent.state_dir.resolve().is_relative_to(tmp_path.resolve())
