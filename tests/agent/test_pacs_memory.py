"""The agent's memory of its PACS on disk: what is kept, what is refused, when it is written."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from relay.agent import pacs_memory
from relay.agent.pacs_memory import MAX_FILE, MEMORY_FILE, kept, load, pacs_key, save
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.survey import StorageMemory
from relay_dev import samples

PACS = PacsTarget("ORTHANC", "127.0.0.1", 4242)
KEY = pacs_key(PACS)
CT, MR = samples.CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def learned() -> StorageMemory:
    memory = StorageMemory()
    memory.remember_seen([MR], [IMPLICIT])
    memory.remember_seen([CT], [EXPLICIT])  # the most recent
    memory.note_counts("get", given=True)
    return memory


def test_a_snapshot_restores_the_same_memory() -> None:
    memory = learned()
    again = StorageMemory()
    again.restore(json.loads(json.dumps(memory.snapshot())))
    assert again.classes() == memory.classes() == [CT, MR]
    assert again.syntaxes() == [EXPLICIT, IMPLICIT]
    assert again.counts_given("get") and not again.counts_given("move")


def test_a_restore_keeps_the_most_recent_within_the_bounds() -> None:
    memory = StorageMemory(max_classes=2, max_syntaxes=1)
    memory.restore({"classes": ["1.1", "1.2", "1.3"], "syntaxes": ["2.1", "2.2"], "counting": []})
    assert memory.classes() == ["1.3", "1.2"]
    assert memory.syntaxes() == ["2.2"]


@pytest.mark.parametrize(
    "saved",
    [
        {"classes": "1.2", "syntaxes": [], "counting": []},
        {"classes": ["1.2", "Doe^Jane"], "syntaxes": [], "counting": []},
        {"classes": ["1." + "2" * 64], "syntaxes": [], "counting": []},
        {"classes": [], "syntaxes": [7], "counting": []},
        {"classes": [], "syntaxes": [], "counting": ["find"]},
        {"classes": [], "syntaxes": []},
        {"classes": ["1.2"] * 70_000, "syntaxes": [], "counting": []},
    ],
)
def test_a_restore_refuses_anything_else_and_changes_nothing(saved: dict[str, object]) -> None:
    memory = learned()
    before = memory.snapshot()
    with pytest.raises(ValueError) as info:
        memory.restore(saved)
    assert memory.snapshot() == before
    assert "Doe" not in str(info.value)  # what is refused is not echoed into the logs


def test_save_then_load(tmp_path: Path) -> None:
    path = tmp_path / "state" / MEMORY_FILE  # state_dir not there yet: created
    save(path, KEY, learned().snapshot())
    assert not path.with_name(MEMORY_FILE + ".tmp").exists()
    memory = StorageMemory()
    assert load(path, KEY, memory)
    assert memory.snapshot() == learned().snapshot()


def test_a_memory_of_another_pacs_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    save(path, pacs_key(PacsTarget("OTHER", "127.0.0.1", 4242)), learned().snapshot())
    memory = StorageMemory()
    assert not load(path, KEY, memory)
    assert memory.snapshot() == StorageMemory().snapshot()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "ignoring"),
        (b"\xff\xfe", "ignoring"),
        (b"[]", "not a version 1 memory"),
        (json.dumps({"v": 2, "pacs": KEY}).encode(), "not a version 1 memory"),
        (json.dumps({"v": 1, "pacs": KEY, "classes": ["x"]}).encode(), "not a UID"),
        (b" " * (MAX_FILE + 1), "larger than"),
    ],
)
def test_a_bad_file_is_an_empty_memory_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, says: str
) -> None:
    path = tmp_path / MEMORY_FILE
    path.write_bytes(content)
    memory = StorageMemory()
    with caplog.at_level(logging.WARNING, logger=pacs_memory.__name__):
        assert not load(path, KEY, memory)
    assert memory.snapshot() == StorageMemory().snapshot()
    assert says in caplog.text and str(path) in caplog.text


def test_a_missing_file_is_an_empty_memory_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=pacs_memory.__name__):
        assert not load(tmp_path / MEMORY_FILE, KEY, StorageMemory())
    assert caplog.text == ""


async def test_kept_loads_saves_changes_and_saves_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    save(path, KEY, learned().snapshot())
    memory = StorageMemory()
    async with kept(tmp_path, PACS, memory, every=0.05):
        assert memory.classes() == [CT, MR]  # loaded before the first request
        memory.remember_seen(["1.2.3"], [])
        for _ in range(100):  # saved by the periodic check, not only at the end
            await asyncio.sleep(0.02)
            if "1.2.3" in json.loads(path.read_text())["classes"]:
                break
        else:
            pytest.fail("a changed memory was not saved while the agent ran")
        memory.note_counts("move", given=True)
    saved = json.loads(path.read_text())
    assert saved["counting"] == ["get", "move"] and saved["pacs"] == KEY


async def test_kept_writes_nothing_for_an_unchanged_memory(tmp_path: Path) -> None:
    async with kept(tmp_path, PACS, StorageMemory(), every=0.01):
        await asyncio.sleep(0.05)
    assert not (tmp_path / MEMORY_FILE).exists()


async def test_kept_survives_a_state_dir_it_cannot_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the directory should be")
    memory = StorageMemory()
    with caplog.at_level(logging.WARNING, logger=pacs_memory.__name__):
        async with kept(blocked, PACS, memory, every=0.01):
            memory.remember_seen([CT], [])
            await asyncio.sleep(0.1)  # several periodic attempts
            memory.remember_seen([MR], [])
    assert caplog.text.count("cannot write") == 1  # once, not at every attempt
    assert memory.classes() == [MR, CT]  # the agent went on learning
