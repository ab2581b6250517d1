"""Config files on disk: bytes -> YAML -> `Reader`, the only module that imports PyYAML.

Parsing is kept apart from the typed schemas (relay.ops.config and the role modules) so
that the gateway's service, which only receives a loader, never imports the YAML parser.
"""

from __future__ import annotations

import codecs
import os
import select
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay.ops.config import ConfigError, Reader, format_size

__all__ = ["MAX_CONFIG_BYTES", "PIPE_DEADLINE", "load_config", "open_config"]

T = TypeVar("T")

# A config file is a few kilobytes; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1024 * 1024
# Seconds a config that is a pipe (`--config <(sops -d agent.yaml)`, a named FIFO) may take
# to arrive whole: a FIFO that no process writes would otherwise hold start-up (or a
# reload) for ever, and a writer that stops half-way must not pass for a whole file.
PIPE_DEADLINE = 10.0
# A FIFO whose writer has not opened it yet reads as end-of-file on some systems (BSD,
# macOS): look again this often until the deadline rather than take it for an empty file.
_PIPE_POLL = 0.05
# Windows editors save "Unicode" as UTF-16 with a byte order mark (Notepad, PowerShell 5.1's
# Out-File and `>`), or UTF-8 with one: a file is decoded by its BOM, as relay.ops.secretinput
# decodes a password (UTF-32 first: its little-endian BOM begins with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


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


def _read_bytes(file: Path) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes of `file`. Opened without blocking where the OS
    has O_NONBLOCK, so that a FIFO with no writer cannot hold the open itself; a pipe is
    then read against PIPE_DEADLINE, anything else as usual."""
    if not hasattr(os, "O_NONBLOCK"):  # Windows: no FIFOs among files
        with open(file, "rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return _read_pipe(fd, file)
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)


def _read_pipe(fd: int, file: Path) -> bytes:
    """A pipe's bytes up to its end-of-file, which must come within PIPE_DEADLINE: never a
    part of the file taken for the whole, never a wait without end."""
    deadline = time.monotonic() + PIPE_DEADLINE
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_CONFIG_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise _pipe_timeout(file, size)
        try:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
        except BlockingIOError:
            continue
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
        elif size:
            break  # end-of-file after the content: the writer is done
        else:
            time.sleep(min(_PIPE_POLL, max(0.0, deadline - time.monotonic())))
    return b"".join(chunks)


def _pipe_timeout(file: Path, size: int) -> ConfigError:
    limit = f"{PIPE_DEADLINE:g}s"
    if size:
        why = f"a pipe whose writer did not finish within {limit} ({size} bytes came): not used"
    else:
        why = f"a pipe (FIFO) that nothing wrote to within {limit}: not used"
    return ConfigError(file, None, why)


def _decode(file: Path, raw: bytes) -> str:
    """The text of a config file: by its byte order mark, UTF-8 without one."""
    encoding, body = "utf-8", raw
    for bom, name in _BOMS:
        if raw.startswith(bom):
            encoding, body = name, raw[len(bom) :]
            break
    if encoding == "utf-8" and b"\0" in body:  # no YAML has one: UTF-16 that lost its BOM
        raise ConfigError(
            file,
            None,
            f"a NUL byte (byte {raw.index(0)}; UTF-16 without a byte order mark?): "
            "save it as UTF-8",
        )
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as exc:
        shown = encoding.upper().removesuffix("-LE").removesuffix("-BE")
        at = exc.start + len(raw) - len(body)
        raise ConfigError(file, None, f"not {shown} text (byte {at}): save it as UTF-8") from None


def open_config(path: str | os.PathLike[str]) -> Reader:
    """Read and parse one config file; its top level must be a mapping."""
    file = Path(path)
    try:
        raw = _read_bytes(file)
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(file, None, f"larger than {format_size(MAX_CONFIG_BYTES)}")
    text = _decode(file, raw)
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
