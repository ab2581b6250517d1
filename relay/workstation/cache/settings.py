"""The `cache:` and `prefetch:` sections of the workstation's config (DESIGN.md section 7)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Final

from pydicom.datadict import dictionary_VR, tag_for_keyword

from relay.ops.config import GiB, Reader, format_duration, format_size, parse_duration

__all__ = ["CacheConfig", "PrefetchConfig", "PrefetchRule", "read_cache", "read_prefetch"]

DEFAULT_MAX_SIZE: Final = 20 * GiB
MIN_MAX_SIZE: Final = 1024 * 1024
# Far beyond any PC's disk: a bigger cache.max_size is a slip of the unit or of a digit,
# and would let the cache fill the disk before it evicted anything.
MAX_MAX_SIZE: Final = 65536 * GiB  # 64 TiB
# A rule runs at start, then every `every`: below MIN_RULE_EVERY it would query the PACS
# without pause; above MAX_RULE_EVERY (a week, which still covers a `-7d..today` rule)
# it is a slip of the unit (30d for 30m) and the rule would sit idle unnoticed.
MIN_RULE_EVERY: Final = 10.0
MAX_RULE_EVERY: Final = 7 * 86400.0
DEFAULT_MAX_AGE: Final = 72 * 3600.0
MAX_RULES: Final = 64
# A DICOM node's read within serve_buffer is held decrypted in memory until sent: a
# typo (a T for a G) must not let one viewer's retrieve take the PC's memory.
MAX_SERVE_BUFFER: Final = 16 * GiB


@dataclass(frozen=True)
class CacheConfig:
    """`enabled` False: no cache, every request goes to the network."""

    dir: Path
    enabled: bool = True
    max_size: int = DEFAULT_MAX_SIZE
    max_age: float = DEFAULT_MAX_AGE
    key: str = "memory"  # memory | keyring
    serve_buffer: int = 256 * 1024 * 1024  # a read that fits is decrypted once


@dataclass(frozen=True)
class PrefetchRule:
    """A worklist rule: C-FIND criteria at the study level, evaluated every `every` s."""

    name: str
    every: float
    match: tuple[tuple[str, str], ...]

    def criteria(self, today: date) -> dict[str, str]:
        """The C-FIND keys with relative dates resolved against `today`."""
        out = {}
        for keyword, value in self.match:
            vr = dictionary_VR(keyword)
            out[keyword] = resolve_dates(value, today) if vr == "DA" else value
        return out


@dataclass(frozen=True)
class PrefetchConfig:
    priors: int = 2
    priors_modality: str = "same"  # same | any
    queue: int = 1000  # studies waiting to be fetched
    rules: tuple[PrefetchRule, ...] = field(default_factory=tuple)


_RELATIVE = re.compile(r"^(today|yesterday)?([+-]\d+)?d?$")


def _one_date(text: str, today: date) -> str:
    text = text.strip().lower()
    if re.fullmatch(r"\d{8}", text) or text == "":
        return text
    m = _RELATIVE.fullmatch(text)
    if m is None or (m.group(1) is None and m.group(2) is None):
        raise ValueError(f"not a date: {text!r} (YYYYMMDD, today, yesterday, today-3d, -7d)")
    base = today - timedelta(days=1) if m.group(1) == "yesterday" else today
    shift = int(m.group(2) or 0)
    return (base + timedelta(days=shift)).strftime("%Y%m%d")


def resolve_dates(value: str, today: date) -> str:
    """`today`, `yesterday`, `today-3d`, `-7d..today` (a range) -> DICOM dates."""
    if ".." in value:
        low, _, high = value.partition("..")
        return f"{_one_date(low, today)}-{_one_date(high, today)}"
    return _one_date(value, today)


def default_cache_dir(config_file: Path) -> Path:
    """The platform's user data dir, one directory per config file (two workstations on
    one PC must never wipe each other's cache)."""
    import platformdirs

    tag = hashlib.sha256(str(config_file).encode()).hexdigest()[:12]
    return Path(platformdirs.user_data_dir("dmz-relay", appauthor=False)) / "cache" / tag


def read_cache(r: Reader, state_dir: Path | None = None) -> CacheConfig:
    """`state_dir`: the workstation's own directory; the cache defaults to `cache/` in it."""
    s = r.section("cache")
    default = state_dir / "cache" if state_dir else default_cache_dir(Path(r.file).resolve())
    directory = s.path("dir") if s.has("dir") else default
    max_size = s.size("max_size", DEFAULT_MAX_SIZE)
    if max_size < MIN_MAX_SIZE:
        raise s.error("max_size", f"must be at least {format_size(MIN_MAX_SIZE)}")
    if max_size > MAX_MAX_SIZE:
        raise s.error(
            "max_size", f"must be at most {format_size(MAX_MAX_SIZE)} (64 TiB), got {max_size}"
        )
    serve_buffer = s.size("serve_buffer", CacheConfig.serve_buffer)
    if serve_buffer > MAX_SERVE_BUFFER:
        raise s.error("serve_buffer", "must be at most 16GiB")
    return CacheConfig(
        dir=directory,
        enabled=s.boolean("enabled", True),
        max_size=max_size,
        max_age=s.duration("max_age", DEFAULT_MAX_AGE, lo=1.0, above_lo=False),
        key=s.choice("key", ("memory", "keyring"), "memory"),
        serve_buffer=serve_buffer,
    )


def _match_text(keyword: str, value: object) -> str:
    """One criterion as C-FIND text: YAML text or a number; anything else is a typo that
    str() would turn into a criterion matching nothing ('None', 'True', "{'a': 1}")."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return str(value)
    raise ValueError(f"match: {keyword}: expected text or a number, got {_show_kind(value)}")


def _match_value(keyword: str, raw: object) -> str:
    """A criterion, or a list of them (DICOM multiple values, joined by a backslash)."""
    if isinstance(raw, list):
        return "\\".join(_match_text(keyword, item) for item in raw)
    return _match_text(keyword, raw)


def _show_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a YAML boolean; quote it if you meant text)"
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a nested list"
    return f"a YAML {type(value).__name__} (quote it if you meant text)"  # 2024-01-01: a date


def _rule_every(value: object) -> float:
    """A rule's `every`, MIN_RULE_EVERY to MAX_RULE_EVERY."""
    try:
        every = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"every: {exc}") from None
    if not MIN_RULE_EVERY <= every <= MAX_RULE_EVERY:
        low, high = format_duration(MIN_RULE_EVERY), format_duration(MAX_RULE_EVERY)
        raise ValueError(f"every: expected a duration {low} to {high}, got {value!r}")
    return every


def _rule(value: object) -> PrefetchRule:
    if not isinstance(value, dict):
        raise ValueError("a rule is a mapping {name, every, match}")
    unknown = set(value) - {"name", "every", "match"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} in a rule")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a rule needs a name")
    every = _rule_every(value.get("every", "5m"))
    match = value.get("match")
    if not isinstance(match, dict) or not match:
        raise ValueError("a rule needs match: {DICOM keyword: value}")
    pairs = []
    today = date.today()
    for keyword, raw in match.items():
        if not isinstance(keyword, str) or tag_for_keyword(keyword) is None:
            raise ValueError(f"match: {keyword!r} is not a DICOM keyword")
        text = _match_value(keyword, raw)
        if dictionary_VR(keyword) == "DA":
            resolve_dates(text, today)  # checked now, resolved at each evaluation
        pairs.append((keyword, text))
    return PrefetchRule(name, every, tuple(pairs))


def read_prefetch(r: Reader) -> PrefetchConfig:
    s = r.section("prefetch")
    rules = tuple(s.sequence("rules", _rule))
    if len(rules) > MAX_RULES:
        raise s.error("rules", f"at most {MAX_RULES} rules")
    return PrefetchConfig(
        priors=s.integer("priors", 2, lo=0, hi=20),
        priors_modality=s.choice("priors_modality", ("same", "any"), "same"),
        queue=s.integer("queue", 1000, lo=1, hi=100_000),
        rules=rules,
    )
