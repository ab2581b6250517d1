"""Config files on disk: bytes -> YAML -> `Reader`, the only module that imports PyYAML.

Parsing is kept apart from the typed schemas (relay.ops.config and the role modules) so
that the gateway's service, which only receives a loader, never imports the YAML parser.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay.ops.config import ConfigError, Reader, format_size

__all__ = ["MAX_CONFIG_BYTES", "load_config", "open_config"]

T = TypeVar("T")

# A config file is a few kilobytes; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice is an error, not a silent
    override (YAML merge keys `<<` still override as usual)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _yaml_error(file: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    kind = (
        "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    )
    return ConfigError(file, None, f"{where}{kind}: {problem}")


def open_config(path: str | os.PathLike[str]) -> Reader:
    """Read and parse one config file; its top level must be a mapping."""
    file = Path(path)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(file, None, f"larger than {format_size(MAX_CONFIG_BYTES)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(file, None, f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from None
    return Reader.document(data, file)


def load_config(path: str | os.PathLike[str], schema: Callable[[Reader], T]) -> T:
    """`schema` applied to the file at `path`; then any key it did not read is an error."""
    r = open_config(path)
    config = schema(r)
    r.done()
    return config
