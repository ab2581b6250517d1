"""The `dicomweb:` keys: loopback only, bounded sizes, errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.ops.config import ConfigError, Reader
from relay.workstation.dicomweb.settings import DEFAULT_MAX_UPLOAD, DicomwebConfig, read_dicomweb

FILE = Path("ws.yaml")


def read(section: object) -> object:
    return read_dicomweb(Reader.document({"dicomweb": section}, FILE))


def test_absent_section_means_no_server() -> None:
    assert read_dicomweb(Reader.document({}, FILE)) is None


def test_defaults() -> None:
    config = read({"listen": "127.0.0.1:8042"})
    assert config is not None and not isinstance(config, bool)
    assert config.viewer is True  # type: ignore[attr-defined]
    assert config.max_upload == DEFAULT_MAX_UPLOAD  # type: ignore[attr-defined]


@pytest.mark.parametrize("address", ["0.0.0.0:8042", "192.168.1.5:8042", "example.org:80"])
def test_a_non_loopback_listen_address_is_refused_naming_file_and_key(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        read({"listen": address})
    text = str(info.value)
    assert "ws.yaml" in text and "dicomweb.listen" in text and "loopback" in text


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:8042", "localhost:8042"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    assert read({"listen": address}) is not None


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_upload", "0"), ("max_upload", "64KB"), ("hold_size", "1KiB"), ("timeout", "0s"),
     ("viewer", "yes"), ("listen", 8042)],
)  # fmt: skip
def test_bad_values_name_their_key(key: str, value: object) -> None:
    section = {"listen": "127.0.0.1:8042", key: value}
    with pytest.raises(ConfigError) as info:
        read(section)
    assert f"dicomweb.{key}" in str(info.value)


def test_an_unknown_key_is_refused() -> None:
    reader = Reader.document({"dicomweb": {"listen": "127.0.0.1:1", "nope": 1}}, FILE)
    read_dicomweb(reader)
    with pytest.raises(ConfigError) as info:
        reader.done()
    assert "dicomweb.nope" in str(info.value)


def test_headers_first_is_off_unless_turned_on() -> None:
    off = read({"listen": "127.0.0.1:8042"})
    on = read({"listen": "127.0.0.1:8042", "headers_first": True})
    assert isinstance(on, DicomwebConfig) and isinstance(off, DicomwebConfig)
    assert on.headers_first is True and off.headers_first is False
    with pytest.raises(ConfigError, match="headers_first"):
        read({"listen": "127.0.0.1:8042", "headers_first": "sometimes"})
