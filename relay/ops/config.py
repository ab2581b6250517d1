"""Typed, validated configuration shared by the three roles (gateway, agent, workstation).

Every value is checked at load time, so that a typo stops start-up with one line that
names the file and the dotted key (`config/agent.yaml: pacs.port: expected an integer
1-65535, got 'abc'`) instead of failing later, deep inside a link. The role schemas
(`gateway.config`, `relay.agent.config`, `relay.workstation.config`) read a parsed mapping
through `Reader`, which tracks the dotted key path and rejects keys nobody asked for; each
section produces the one type the runtime uses (`limits:` is `relay.proto.LinkSettings`).

This module imports only the standard library and relay.proto, never PyYAML: the files
are parsed by relay.ops.configfile, which the gateway's service does not import.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay.proto.settings import MAX_STREAMS_RANGE, FieldError, LinkSettings, format_size

__all__ = [
    "DEFAULT_LOG_LEVEL",
    "LOG_LEVELS",
    "RESERVED_SERVICE_NAMES",
    "Address",
    "Backoff",
    "ConfigError",
    "FieldError",
    "LinkSettings",
    "Reader",
    "TlsFiles",
    "check_ae_title",
    "check_host",
    "format_duration",
    "format_size",
    "parse_address",
    "parse_duration",
    "parse_size",
    "read_backoff",
    "read_drain_grace",
    "read_limits",
    "read_log_level",
    "read_tls",
]

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"

# Stream targets that are not TCP services: no service may take these names.
RESERVED_SERVICE_NAMES = frozenset({"dicom"})


class ConfigError(Exception):
    """A config file cannot be used. `str()` is the one line to show the operator.

    `file` is the config file as the user named it, `key` the dotted key (`pacs.port`,
    `gateways[1]`), or None when the problem concerns the whole file (syntax, top level).
    """

    def __init__(self, file: str | os.PathLike[str], key: str | None, message: str) -> None:
        self.file = Path(file)
        self.key = key
        self.message = message
        where = f"{os.fspath(file)}: {key}: " if key else f"{os.fspath(file)}: "
        super().__init__(where + message)


# --------------------------------------------------------------------------- values


def _show(value: object) -> str:
    """How a bad value appears in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a YAML boolean; quote it if you meant text)"
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(value: object) -> int:
    """A byte count: an integer, or a string such as "65536", "64KiB", "1MiB", "16MiB".

    Only binary units (B, KiB, MiB, GiB) are accepted: "64KB" is ambiguous and refused.
    Raises ValueError with a message that says what was expected.
    """
    if _is_int(value):
        assert isinstance(value, int)
        if value < 0:
            raise ValueError(f"expected a size (65536, 64KiB, 1MiB), got {_show(value)}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size (65536, 64KiB, 1MiB), got {_show(value)}")


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-z]*)\s*")


def parse_duration(value: object) -> float:
    """Seconds: a number, or a string such as "0.5s", "90s", "15m", "24h", "30d", "250ms".

    Raises ValueError for negative, infinite or malformed values.
    """
    seconds: float | None = None
    if _is_number(value):
        assert isinstance(value, int | float)
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m and m.group(2) in ("", *_DURATION_UNITS):
            number = float(m.group(1))
            seconds = number if m.group(2) == "" else number * _DURATION_UNITS[m.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration (30, 90s, 15m, 24h, 30d), got {_show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """An exact spelling of `seconds` that `parse_duration` reads back ("30d", "90s", "0.5s")."""
    if seconds == 0:
        return "0s"
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
            if whole % factor == 0:
                return f"{whole // factor}{unit}"
        return f"{whole}s"
    return f"{float(seconds)!r}s"


# --------------------------------------------------------------------------- addresses


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")


def check_host(host: object) -> str:
    """`host` if it is an IPv4/IPv6 literal (no brackets) or a DNS name; ValueError otherwise."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"expected a host name or IP address, got {_show(host)}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        return host
    if _DIGITS_AND_DOTS.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        return host
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid host name {host!r}")
    return host


@dataclass(frozen=True)
class Address:
    """A TCP endpoint. `host` is an IP literal (IPv6 without brackets) or a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and "localhost": reachable from this machine only."""
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


_BRACKETED_RE = re.compile(r"\[([^\[\]]+)\](?::([^:]*))?")


def parse_address(
    text: str, *, default_port: int | None = None, allow_port_zero: bool = False
) -> Address:
    """Parse "127.0.0.1:8443", "[::1]:8443" or "gw.example.org:8443".

    Without a port, `default_port` is used, or ValueError is raised. Port 0 ("any free
    port") is accepted only where `allow_port_zero` is set: for listen addresses.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an address host:port, got {_show(text)}")
    port_text: str | None
    bracketed = _BRACKETED_RE.fullmatch(text)
    if bracketed:
        host, port_text = bracketed.group(1), bracketed.group(2)
        if ":" not in host:
            raise ValueError(f"brackets are for IPv6 addresses only, got {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"an IPv6 address needs brackets, as in [::1]:8443, got {text!r}")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"expected an address host:port, got {text!r} (no host)")
    try:
        check_host(host)
    except ValueError as exc:
        raise ValueError(f"expected an address host:port, got {text!r}: {exc}") from None
    lowest = 0 if allow_port_zero else 1
    if port_text is None:
        if default_port is None:
            raise ValueError(f"expected an address host:port, got {text!r} (no port)")
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and len(port_text) <= 5:
        port = int(port_text)
    else:
        raise ValueError(f"expected a port {lowest}-65535 in {text!r}, got {port_text!r}")
    if not lowest <= port <= 65535:
        raise ValueError(f"expected a port {lowest}-65535 in {text!r}, got {port}")
    return Address(host, port)


# --------------------------------------------------------------------------- names


def check_ae_title(value: object) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash, no edge spaces."""
    if (
        isinstance(value, str)
        and 1 <= len(value) <= 16
        and value == value.strip(" ")
        and all(" " <= c <= "~" and c != "\\" for c in value)
    ):
        return value
    raise ValueError(
        "expected an AE title of 1-16 printable ASCII characters without backslash "
        f"or leading/trailing spaces, got {_show(value)}"
    )


# --------------------------------------------------------------------------- shared sections


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one TLS endpoint: its certificate, its key, and the site CA bundle."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential from `initial` up to `maximum`, with full jitter.

    YAML `reconnect: {initial: 0.5s, max: 30s}`.
    """

    initial: float = 0.5
    maximum: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= 3600:
            raise FieldError(
                "initial", f"expected a duration above 0s and up to 1h, got {self.initial}s"
            )
        if not self.initial <= self.maximum <= 86400:
            raise FieldError(
                "max",
                f"expected a duration from initial ({self.initial}s) up to 1d, got {self.maximum}s",
            )


def _resolve(base_dir: Path, value: str) -> Path:
    """`value` relative to `base_dir`; `..` folded lexically, symlinks kept (so that a
    reload follows a Kubernetes secret whose symlink was swapped)."""
    return Path(os.path.abspath(base_dir / Path(value).expanduser()))


# --------------------------------------------------------------------------- reader


class _Required(enum.Enum):
    TOKEN = 0


REQUIRED = _Required.TOKEN
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Reader:
    """One YAML mapping and its dotted path, with typed getters.

    Each getter marks its key as known; `done()` then rejects any key nobody asked for.
    An absent key (or `null`) takes the getter's default, or is an error without one.
    Bad values raise ConfigError naming the file and the dotted key.
    """

    def __init__(
        self,
        data: Mapping[Any, Any],
        *,
        file: Path,
        base_dir: Path,
        prefix: str = "",
    ) -> None:
        self.file = file
        self.base_dir = base_dir
        self.prefix = prefix
        self._data = data
        for k in data:
            if not isinstance(k, str):
                raise self.error(None, f"keys must be text, got {_show(k)} (quote it)")
        self._used: set[str] = set()
        self._children: list[Reader] = []

    @classmethod
    def document(cls, data: object, file: str | os.PathLike[str]) -> Reader:
        """The top level of a parsed config file (it must be a mapping of keys); relative
        paths in it are relative to the file's directory."""
        path = Path(file)
        if data is None:
            raise ConfigError(path, None, "the file is empty; expected a mapping of keys")
        if not isinstance(data, dict):
            raise ConfigError(
                path, None, f"the top level must be a mapping of keys, got {_show(data)}"
            )
        return cls(data, file=path, base_dir=Path(os.path.abspath(path)).parent)

    # -- naming and errors

    def key(self, name: str) -> str:
        """The dotted path of `name` in this section (`pacs.port`, `forward["a:1"]`)."""
        part = f".{name}" if _SIMPLE_KEY.fullmatch(name) else f'["{name}"]'
        return (self.prefix + part).lstrip(".")

    def error(self, name: str | None, message: str) -> ConfigError:
        """A ConfigError for `name` in this section (None: the section itself)."""
        key = self.key(name) if name is not None else (self.prefix or None)
        return ConfigError(self.file, key, message)

    def present_keys(self) -> list[str]:
        """The keys present, for sections whose keys are data (services, forward)."""
        return list(self._data)

    def has(self, name: str) -> bool:
        """Whether `name` is present with a non-null value."""
        return self._data.get(name) is not None

    def done(self) -> None:
        """Reject unknown keys here and in every section read through this one."""
        for child in self._children:
            child.done()
        unknown = [k for k in self._data if k not in self._used]
        if unknown:
            first = unknown[0]
            close = difflib.get_close_matches(str(first), sorted(self._used), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            more = f"; also {', '.join(map(repr, unknown[1:]))}" if len(unknown) > 1 else ""
            raise self.error(str(first), f"unknown key{hint}{more}")

    # -- the generic getter

    def raw(self, name: str) -> object:
        """The value as YAML gave it (None if absent), marking the key as known."""
        self._used.add(name)
        return self._data.get(name)

    def get(
        self, name: str, convert: Callable[[object], T], default: T | _Required = REQUIRED
    ) -> T:
        """`convert(value)`; ValueError from it becomes a ConfigError for this key."""
        value = self.raw(name)
        if value is None:
            if not isinstance(default, _Required):
                return default
            if name not in self._data:
                close = difflib.get_close_matches(name, [str(k) for k in self._data], n=1)
                hint = f" (is {close[0]!r} a misspelling?)" if close else ""
                raise self.error(name, f"missing required key{hint}")
        try:
            return convert(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    # -- typed getters

    def text(
        self,
        name: str,
        default: str | _Required = REQUIRED,
        *,
        check: Callable[[object], str] | None = None,
    ) -> str:
        """A string, optionally validated by `check` (check_name, check_ae_title)."""

        def convert(value: object) -> str:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected text, got {_show(value)}")
            return check(value) if check is not None else value

        return self.get(name, convert, default)

    def integer(self, name: str, default: int | _Required = REQUIRED, *, lo: int, hi: int) -> int:
        """An integer in lo..hi (booleans and numeric strings are refused)."""

        def convert(value: object) -> int:
            if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
                return value
            raise ValueError(f"expected an integer {lo}-{hi}, got {_show(value)}")

        return self.get(name, convert, default)

    def boolean(self, name: str, default: bool | _Required = REQUIRED) -> bool:
        """true or false."""

        def convert(value: object) -> bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {_show(value)}")

        return self.get(name, convert, default)

    def size(self, name: str, default: int | _Required = REQUIRED) -> int:
        """A byte count (`parse_size`); ranges are checked by the dataclass that uses it."""
        return self.get(name, parse_size, default)

    def duration(
        self,
        name: str,
        default: float | _Required = REQUIRED,
        *,
        lo: float = 0.0,
        hi: float = 365 * 86400.0,
        above_lo: bool = False,
    ) -> float:
        """Seconds (`parse_duration`) within lo..hi (lo excluded when `above_lo`)."""

        def convert(value: object) -> float:
            seconds = parse_duration(value)
            ok = (lo < seconds if above_lo else lo <= seconds) and seconds <= hi
            if not ok:
                low = f"above {format_duration(lo)}" if above_lo else format_duration(lo)
                raise ValueError(
                    f"expected a duration {low} to {format_duration(hi)}, got {_show(value)}"
                )
            return seconds

        return self.get(name, convert, default)

    def choice(self, name: str, choices: tuple[str, ...], default: str | _Required) -> str:
        """One of `choices`, spelled exactly."""

        def convert(value: object) -> str:
            if isinstance(value, str) and value in choices:
                return value
            raise ValueError(f"expected one of {', '.join(choices)}; got {_show(value)}")

        return self.get(name, convert, default)

    def address(
        self, name: str, default: Address | _Required = REQUIRED, *, listen: bool = False
    ) -> Address:
        """host:port (`parse_address`); `listen` allows port 0 (any free port)."""

        def convert(value: object) -> Address:
            if not isinstance(value, str):
                raise ValueError(f"expected an address host:port, got {_show(value)}")
            return parse_address(value, allow_port_zero=listen)

        return self.get(name, convert, default)

    def optional_address(self, name: str, *, listen: bool = False) -> Address | None:
        """host:port, or None when absent or null."""
        value = self.raw(name)
        return None if value is None else self.address(name, listen=listen)

    def addresses(
        self, name: str, *, min_len: int = 0, listen: bool = False
    ) -> tuple[Address, ...]:
        """A list of distinct host:port addresses (absent or null: empty)."""

        def convert(value: object) -> Address:
            if not isinstance(value, str):
                raise ValueError(f"expected an address host:port, got {_show(value)}")
            return parse_address(value, allow_port_zero=listen)

        found = self.sequence(name, convert, min_len=min_len)
        for i, address in enumerate(found):
            if address in found[:i]:
                raise ConfigError(self.file, f"{self.key(name)}[{i}]", f"{address} is listed twice")
        return tuple(found)

    def path(self, name: str, default: str | _Required = REQUIRED) -> Path:
        """A path, relative to the config file's directory; need not exist."""

        def convert(value: object) -> Path:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {_show(value)}")
            if "\0" in value:  # no OS takes one: open() and mkdir() raise ValueError
                raise ValueError(f"a path cannot contain a NUL character, got {_show(value)}")
            return _resolve(self.base_dir, value)

        if not isinstance(default, _Required):
            return self.get(name, convert, convert(default))
        return self.get(name, convert)

    def existing_file(self, name: str) -> Path:
        """A path that must name a regular file now (certificates, keys)."""
        path = self.path(name)
        if not path.exists():
            raise self.error(name, f"file not found: {path}")
        if not path.is_file():
            raise self.error(name, f"not a regular file: {path}")
        return path

    def sequence(self, name: str, convert: Callable[[object], T], *, min_len: int = 0) -> list[T]:
        """A YAML list (absent or null: empty); item errors name `key[i]`."""
        value = self.raw(name)
        if value is None:
            value = []
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {_show(value)}")
        if len(value) < min_len:
            raise self.error(name, f"expected at least {min_len} item(s), got {len(value)}")
        items: list[T] = []
        for i, item in enumerate(value):
            try:
                items.append(convert(item))
            except ValueError as exc:
                raise ConfigError(self.file, f"{self.key(name)}[{i}]", str(exc)) from None
        return items

    def section(self, name: str) -> Reader:
        """A nested mapping (absent or null: empty), read with its own dotted prefix."""
        value = self.raw(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a mapping, got {_show(value)}")
        child = Reader(value, file=self.file, base_dir=self.base_dir, prefix=self.key(name))
        self._children.append(child)
        return child

    def optional_section(self, name: str) -> Reader | None:
        """A nested mapping, or None when absent or null."""
        return None if self.raw(name) is None else self.section(name)

    def build(self, factory: Callable[..., T], **fields: Any) -> T:
        """`factory(**fields)`, turning its FieldError into a ConfigError for that key."""
        try:
            return factory(**fields)
        except FieldError as exc:
            raise self.error(exc.field, str(exc)) from None


# --------------------------------------------------------------------------- shared readers


def read_tls(r: Reader, name: str = "tls") -> TlsFiles:
    """`tls: {cert, key, ca}`, all required, all existing files."""
    if not r.has(name):
        r.raw(name)
        raise r.error(name, "missing required key (a mapping with cert, key and ca)")
    s = r.section(name)
    return TlsFiles(
        cert=s.existing_file("cert"), key=s.existing_file("key"), ca=s.existing_file("ca")
    )


def read_limits(r: Reader, defaults: LinkSettings | None = None) -> LinkSettings:
    """`limits:`, every sub-key optional (`defaults`: the role's); bounds are LinkSettings'."""
    s = r.section("limits")
    d = defaults or LinkSettings()
    low, high = MAX_STREAMS_RANGE
    return s.build(
        LinkSettings,
        stream_window=s.size("stream_window", d.stream_window),
        link_window=s.size("link_window", d.link_window),
        max_frame=s.size("max_frame", d.max_frame),
        max_streams=s.integer("max_streams", d.max_streams, lo=low, hi=high),
        keepalive_interval=s.duration("keepalive_interval", d.keepalive_interval),
        keepalive_timeout=s.duration("keepalive_timeout", d.keepalive_timeout),
    )


def read_backoff(r: Reader) -> Backoff:
    """`reconnect: {initial, max}`, both optional."""
    s = r.section("reconnect")
    d = Backoff()
    return s.build(
        Backoff,
        initial=s.duration("initial", d.initial),
        maximum=s.duration("max", d.maximum),
    )


MAX_DRAIN_GRACE = 3600.0


def read_drain_grace(r: Reader, default: float) -> float:
    """`drain_grace:` how long a stopping role lets open streams finish (0s-1h)."""
    return r.duration("drain_grace", default, hi=MAX_DRAIN_GRACE)


def read_log_level(r: Reader) -> str:
    """`log_level:` debug | info | warning | error (default info)."""
    return r.choice("log_level", LOG_LEVELS, DEFAULT_LOG_LEVEL)
