"""The workstation's configuration file, typed and validated at load time.

`state_dir` holds what the running workstation keeps (the control endpoint's file; the
cache of later issues). By default it lies in the user's data directory of the platform
(platformdirs), one per config file, so that two workstations on one PC (two sites)
never share one and `relay workstation reload --config FILE` finds the right one.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import platformdirs

from relay.dicom.session import MAX_RESUME_WINDOW, RESUME_WINDOW
from relay.ops.config import (
    DEFAULT_LOG_LEVEL,
    RESERVED_SERVICE_NAMES,
    Address,
    Backoff,
    ConfigError,
    LinkSettings,
    Reader,
    TlsFiles,
    check_ae_title,
    parse_address,
    read_backoff,
    read_drain_grace,
    read_limits,
    read_log_level,
)
from relay.ops.configfile import load_config, open_config
from relay.trust.identity import check_name
from relay.workstation import localpeer
from relay.workstation.cache.settings import (
    CacheConfig,
    PrefetchConfig,
    default_cache_dir,
    read_cache,
    read_prefetch,
)
from relay.workstation.dicomweb.settings import DicomwebConfig, read_dicomweb
from relay.workstation.localpeer import ACCESS_CHOICES, DEFAULT_ACCESS, LocalAccess

__all__ = [
    "IDENTITY_FILES",
    "DicomNodeConfig",
    "WorkstationConfig",
    "default_state_dir",
    "fold_name",
    "load_workstation_config",
    "path_key",
    "read_workstation_config",
    "state_dir_of",
    "user_data_dir",
]

# What `relay enroll` and `relay pki issue` write into the identity directory.
IDENTITY_FILES = ("device.crt", "device.key", "ca.crt")
APP_NAME = "dmz-relay"


def user_data_dir() -> Path:
    """The user's data directory for DMZ Relay: ~/.local/share/dmz-relay (Linux, or
    $XDG_DATA_HOME/dmz-relay), ~/Library/Application Support/dmz-relay (macOS),
    %LOCALAPPDATA%\\dmz-relay (Windows)."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def path_key(path: str | os.PathLike[str], platform: str | None = None) -> str:
    """`path` as the file system of `platform` (default: this one) tells names apart:
    absolute, then folded by `fold_name`. Two spellings of one file give one key, and two
    files never share one."""
    return fold_name(os.path.abspath(path), platform or sys.platform)


def fold_name(name: str, platform: str) -> str:
    """`name` as the default file system of `platform` compares names.

    Windows (NTFS): each UTF-16 character by the volume's upcase table, a simple
    one-to-one uppercase mapping with no Unicode normalisation (`_ntfs_fold`): `ß` stays
    `ß`, not `ss` as str.casefold() makes it, so "Straße" and "STRASSE" stay two files.
    macOS (APFS, HFS+): case-insensitive and normalisation-insensitive, so a name typed
    in NFC and the same name listed in NFD (as HFS+ stores it) are one file: the
    canonical caseless form, NFC of casefold of NFD. Elsewhere: the name as it is."""
    if platform == "win32":
        return "".join(map(_ntfs_fold, name))
    if platform == "darwin":
        return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())
    return name


def _simple_upper(char: str) -> str:
    """`char`'s uppercase if it is one character, else `char` itself: Python has only the
    full mapping (ß -> SS), NTFS only a one-to-one table."""
    upper = char.upper()
    return upper if len(upper) == 1 else char


def _ntfs_fold(char: str) -> str:
    """One character's key as NTFS compares it: its simple uppercase, written lowercase
    where that lowercase comes back to the same uppercase (so plain names keep the
    lowercase keys they always had), else the uppercase itself (the Kelvin sign is not
    `k` to NTFS). Beyond the BMP (surrogate pairs to NTFS) nothing is folded."""
    if ord(char) > 0xFFFF:
        return char
    upper = _simple_upper(char)
    lower = upper.lower()
    return lower if len(lower) == 1 and _simple_upper(lower) == upper else upper


def _previous_keys(config_path: str | os.PathLike[str], platform: str) -> list[str]:
    """The keys earlier versions gave this path: the path as spelled (macOS before it
    folded case), and str.casefold() of it (Windows and macOS before fold_name)."""
    spelled = os.path.abspath(config_path)
    if platform == "darwin":
        return [spelled, spelled.casefold()]
    if platform == "win32":
        return [os.path.normcase(spelled).casefold()]
    return []


def _state_dir_name(key: str) -> str:
    """`<config name>-<8 hex digits of key>`, the name as spelled in `key`."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(key).stem)[:40]
    return f"{stem or 'config'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def default_state_dir(config_path: str | os.PathLike[str]) -> Path:
    """`user_data_dir()/workstation/<config name>-<8 hex digits of its path_key>`: one per
    config file, whichever spelling of its path a command is given (`--config Site.yaml`
    and `site.yaml` must find the same running workstation, lock and cache).

    A directory an earlier version made under another key (`_previous_keys`) is kept
    while it exists and the current one does not: an upgrade neither loses the cache and
    the revocation marker nor stops finding a workstation that the previous version
    started."""
    workstation = user_data_dir() / "workstation"
    key = path_key(config_path)
    folded = workstation / _state_dir_name(key)
    if not folded.exists():
        for previous in _previous_keys(config_path, sys.platform):
            legacy = workstation / _state_dir_name(previous)
            if previous != key and legacy.exists():
                return legacy
    return folded


_DESTINATION_HERE = (
    "a C-MOVE destination must be on this PC, a loopback address (127.0.0.1, [::1] or "
    "localhost): the instances go to it as cleartext DICOM"
)
_LOOPBACK_ONLY = (
    "must be a loopback address (127.0.0.1, [::1] or localhost): whoever reaches it "
    "reaches the hospital with this device's identity"
)


@dataclass(frozen=True)
class DicomNodeConfig:
    """The local DICOM node that viewers talk to.

    `destinations` maps C-MOVE destination AE titles to DICOM nodes on this PC.
    `resume_window`: how long a retrieval whose link broke waits for a new one before it
    ends in failure (seconds; 0: at once, no resuming).
    """

    listen: Address
    ae_title: str = "RELAY"
    destinations: Mapping[str, Address] = field(default_factory=lambda: MappingProxyType({}))
    resume_window: float = RESUME_WINDOW


@dataclass(frozen=True)
class WorkstationConfig:
    """Everything `relay workstation` needs; see config/workstation.yaml for the keys.

    `dicom` None: no local DICOM node. `forward` maps a local listen address to the
    name of a service the agent allows. Durations are seconds. The loader always sets
    `state_dir`; None (embedded in tests) runs no control endpoint.
    """

    path: Path
    gateway: Address
    identity_dir: Path
    metrics_listen: Address | None
    dicom: DicomNodeConfig | None
    forward: Mapping[Address, str] = field(default_factory=lambda: MappingProxyType({}))
    state_dir: Path | None = None  # None: embedded (tests), no control endpoint
    limits: LinkSettings = field(default_factory=LinkSettings)
    reconnect: Backoff = field(default_factory=Backoff)
    drain_grace: float = 30.0
    log_level: str = DEFAULT_LOG_LEVEL
    cache: CacheConfig | None = None  # None: the default (on, platform data dir)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    dicomweb: DicomwebConfig | None = None  # None: no DICOMweb server
    local_access: LocalAccess = DEFAULT_ACCESS  # who on this PC may use the listeners

    def cache_settings(self) -> CacheConfig:
        if self.cache is not None:
            return self.cache
        return CacheConfig(
            dir=self.state_dir / "cache" if self.state_dir else default_cache_dir(self.path)
        )

    def keyring_account(self, identity: object) -> str:
        """The cache key's account in the OS keyring: this device at this state directory,
        by its path_key, so a start under another spelling of the config's path finds the
        key (a new key would make the cache unreadable: wiped)."""
        where = self.state_dir if self.state_dir is not None else self.path
        return f"{identity} {path_key(where)}"

    def legacy_keyring_account(self, identity: object) -> str:
        """The account before keyring_account (the config path as given): a key found
        there is moved to keyring_account."""
        return f"{identity} {self.path}"

    def identity_files(self) -> TlsFiles:
        """The device's certificate, key and the pinned site CA in `identity_dir`."""
        cert, key, ca = (self.identity_dir / name for name in IDENTITY_FILES)
        return TlsFiles(cert=cert, key=key, ca=ca)


def _read_identity_dir(r: Reader) -> Path:
    directory = r.path("identity_dir")
    for name in IDENTITY_FILES:
        if not (directory / name).is_file():
            raise r.error(
                "identity_dir",
                f"{name} not found in {directory} (enroll first: relay enroll CODE "
                f"--dir {directory})",
            )
    return directory


def _check_loopback(s: Reader, name: str, address: Address) -> Address:
    if not address.is_loopback:
        raise s.error(name, f"{_LOOPBACK_ONLY}, got {address}")
    return address


def _read_dicom(r: Reader) -> DicomNodeConfig | None:
    s = r.optional_section("dicom")
    if s is None:
        return None
    listen = _check_loopback(s, "listen", s.address("listen", listen=True))
    ae_title = s.text("ae_title", DicomNodeConfig.ae_title, check=check_ae_title)
    d = s.section("destinations")
    destinations: dict[str, Address] = {}
    for title in d.present_keys():
        try:
            check_ae_title(title)
        except ValueError as exc:
            raise d.error(title, str(exc)) from None
        destinations[title] = address = d.address(title)
        if not address.is_loopback:  # a C-MOVE sends it the PACS's images in the clear
            raise d.error(title, f"{_DESTINATION_HERE}, got {address}")
    resume_window = s.duration("resume_window", RESUME_WINDOW, hi=MAX_RESUME_WINDOW)
    return DicomNodeConfig(listen, ae_title, MappingProxyType(destinations), resume_window)


def _read_forward(r: Reader) -> Mapping[Address, str]:
    s = r.section("forward")
    forward: dict[Address, str] = {}
    for text in s.present_keys():
        try:
            address = parse_address(text, allow_port_zero=True)
        except ValueError as exc:
            raise s.error(text, str(exc)) from None
        _check_loopback(s, text, address)
        if address in forward:
            raise s.error(text, f"{address} is forwarded twice")
        service = s.text(text, check=lambda v: check_name(v, "service name"))
        if service in RESERVED_SERVICE_NAMES:
            raise s.error(text, f"{service!r} is not a TCP service; use the dicom: section")
        forward[address] = service
    return MappingProxyType(forward)


def _read_local_access(r: Reader) -> LocalAccess:
    access = r.choice("local_access", ACCESS_CHOICES, DEFAULT_ACCESS)
    if access == "same-user" and not localpeer.is_supported():
        raise r.error("local_access", f"same-user is not available on {sys.platform}")
    return "same-user" if access == "same-user" else "any"


def _check_listeners_distinct(r: Reader, config: WorkstationConfig) -> None:
    """Two listeners on one fixed port would fail only at start-up: say which keys."""
    seen: dict[Address, str] = {}
    listeners: list[tuple[str, Address | None]] = [("metrics_listen", config.metrics_listen)]
    if config.dicom is not None:
        listeners.append(("dicom.listen", config.dicom.listen))
    if config.dicomweb is not None:
        listeners.append(("dicomweb.listen", config.dicomweb.listen))
    listeners += [(f'forward["{a}"]', a) for a in config.forward]
    for key, address in listeners:
        if address is None or address.port == 0:
            continue
        if address in seen:
            raise ConfigError(r.file, key, f"{address} is also used by {seen[address]}")
        seen[address] = key


def load_workstation_config(path: str | os.PathLike[str]) -> WorkstationConfig:
    """Load and check a workstation config file; raises relay.ops.config.ConfigError."""
    return load_config(path, read_workstation_config)


def read_workstation_config(r: Reader) -> WorkstationConfig:
    """The workstation's schema, applied to a parsed config file."""
    gateway = r.address("gateway")
    state_dir = r.path("state_dir", str(default_state_dir(r.file)))
    identity_dir = _read_identity_dir(r)
    config = WorkstationConfig(
        path=Path(os.path.abspath(r.file)),
        gateway=gateway,
        identity_dir=identity_dir,
        metrics_listen=r.optional_address("metrics_listen", listen=True),
        dicom=_read_dicom(r),
        forward=_read_forward(r),
        limits=read_limits(r),
        reconnect=read_backoff(r),
        drain_grace=read_drain_grace(r, WorkstationConfig.drain_grace),
        log_level=read_log_level(r),
        state_dir=state_dir,
        cache=read_cache(r, state_dir),
        prefetch=read_prefetch(r),
        dicomweb=read_dicomweb(r),
        local_access=_read_local_access(r),
    )
    _check_listeners_distinct(r, config)
    return config


def state_dir_of(path: str | os.PathLike[str]) -> Path:
    """Only the `state_dir` of a config file: how `relay workstation reload|stop|status`
    finds the running workstation, which judges the rest of the file itself.

    Only a regular file is read: a FIFO (a config fed by a secrets tool) would give this
    lookup the contents meant for the workstation's own reload, which then read nothing,
    or hold it until the FIFO's deadline. Anything else is a ConfigError naming
    `--state-dir`; `os.stat` opens nothing, so it cannot wait on a FIFO."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG  # missing, unreadable: open_config says why, as before
    if not stat.S_ISREG(mode):
        raise ConfigError(
            path,
            None,
            "not a regular file (a FIFO?): reading it here would take what the workstation "
            "is to read; name the workstation's state directory with --state-dir DIR",
        )
    return open_config(path).path("state_dir", str(default_state_dir(path)))
