"""Windows: a file only its user may read, with the security descriptor (ctypes, advapi32).

Mode bits mean nothing there (os.chmod only sets the read-only flag); what protects a
file is its DACL. `restrict_to_user` replaces it with one protected (not inherited)
entry granting the current user full control; `readers_besides_user` reads it back as
SDDL and says who else may read. The SDDL judgement is plain Python (`other_readers`),
tested on every platform; the ctypes calls run on Windows only (the hosted workflow).
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Ace",
    "AclError",
    "current_user_sid",
    "describe",
    "file_sddl",
    "other_readers",
    "parse_sddl_dacl",
    "readers_besides_user",
    "restrict_to_user",
]

# Accounts that may read anything anyway: LocalSystem and the Administrators group.
TRUSTED = frozenset({"SY", "S-1-5-18", "BA", "S-1-5-32-544"})
# Well-known SDDL aliases, for messages.
_ALIASES = {
    "WD": "Everyone",
    "AU": "Authenticated Users",
    "BU": "BUILTIN\\Users",
    "BG": "BUILTIN\\Guests",
    "IU": "INTERACTIVE",
    "NU": "NETWORK",
    "AN": "ANONYMOUS LOGON",
    "OW": "OWNER RIGHTS",
    "CO": "CREATOR OWNER",
    "S-1-1-0": "Everyone",
    "S-1-5-11": "Authenticated Users",
    "S-1-5-32-545": "BUILTIN\\Users",
}
# Rights that let a trustee read a file's data, or give itself that right: FILE_READ_DATA,
# WRITE_DAC (grant itself read), WRITE_OWNER (take ownership, then WRITE_DAC),
# MAXIMUM_ALLOWED, GENERIC_ALL, GENERIC_READ.
_READ_BITS = 0x1 | 0x40000 | 0x80000 | 0x2000000 | 0x10000000 | 0x80000000
# SDDL codes that do none of that (on a file: write, execute, delete, attributes, EAs).
# Any other code counts as read, the known ones (GA GR FA FR KA KR KX WD WO, CC = bit
# 0x1) and the unknown alike: a privacy check trusts only what it understands.
_NO_READ_CODES = frozenset(
    {"GW", "GX", "RC", "SD", "FW", "FX", "KW", "DC", "LC", "SW", "RP", "WP", "DT", "LO", "CR"}
)
_ACE = re.compile(r"\(([^()]*)\)")

# advapi32 constants
_SE_FILE_OBJECT = 1
_OWNER_SECURITY_INFORMATION = 0x1
_DACL_SECURITY_INFORMATION = 0x4
_PROTECTED_DACL_SECURITY_INFORMATION = 0x80000000
_SDDL_REVISION_1 = 1
_TOKEN_QUERY = 0x8
_TOKEN_USER = 1


class AclError(OSError):
    """The security descriptor could not be read or written."""


@dataclass(frozen=True)
class Ace:
    kind: str  # A (allow), D (deny), ...
    flags: str  # OI, CI, IO, ID...
    rights: str  # FA, FR..., or a hex mask
    trustee: str  # a SID string or an SDDL alias (SY, BA, WD...)

    @property
    def grants_read(self) -> bool:
        if self.kind != "A" or "IO" in _pairs(self.flags):  # inherit-only: not this file
            return False
        if self.rights.lower().startswith("0x"):
            try:
                return bool(int(self.rights, 16) & _READ_BITS)
            except ValueError:
                return True  # not a mask we can read: not trusted
        return any(code not in _NO_READ_CODES for code in _pairs(self.rights))


def describe(trustee: str) -> str:
    """A trustee of `other_readers` as a person reads it (Everyone, BUILTIN\\Users...)."""
    if trustee.startswith("owner:"):
        return f"the owner {describe(trustee.removeprefix('owner:'))}"
    return _ALIASES.get(trustee, "everyone" if trustee == "*" else trustee)


def _pairs(text: str) -> list[str]:
    return [text[i : i + 2] for i in range(0, len(text), 2)]


def parse_sddl_dacl(sddl: str) -> tuple[str | None, list[Ace] | None]:
    """The owner and the DACL's entries of an SDDL string; None entries for a NULL DACL
    (everyone has full access)."""
    owner_match = re.search(r"O:([^:()]*?)(?=[GDS]:|$)", sddl)
    owner = owner_match.group(1) if owner_match else None
    dacl_at = sddl.find("D:")
    if dacl_at < 0 or sddl[dacl_at + 2 :].startswith("NO_ACCESS_CONTROL"):
        return owner, None
    dacl = sddl[dacl_at + 2 :]
    sacl_at = dacl.find(")S:")  # a SACL may follow the last entry
    if sacl_at >= 0:
        dacl = dacl[: sacl_at + 1]
    aces = []
    for body in _ACE.findall(dacl):
        parts = body.split(";")
        if len(parts) < 6:
            continue
        aces.append(Ace(parts[0], parts[1], parts[2], parts[5]))
    return owner, aces


def other_readers(sddl: str, user_sid: str) -> list[str]:
    """Who besides `user_sid`, SYSTEM and Administrators may read: trustees of allow
    entries granting read or the rights to take it (WRITE_DAC, WRITE_OWNER...), or `*`
    for a NULL DACL, or `owner:X` when someone else owns it (an owner can rewrite the
    DACL)."""
    owner, aces = parse_sddl_dacl(sddl)
    allowed = TRUSTED | {user_sid}
    found: list[str] = []
    if owner is not None and owner not in allowed:
        found.append(f"owner:{owner}")
    if aces is None:
        return [*found, "*"]
    for ace in aces:
        trustee = ace.trustee
        if trustee == "OW" and owner == user_sid:  # OWNER RIGHTS, and the owner is us
            continue
        if ace.grants_read and trustee not in allowed and trustee not in found:
            found.append(trustee)
    return found


# --- ctypes (Windows only) ------------------------------------------------------------


def _advapi() -> Any:
    if sys.platform != "win32":
        raise AclError("Windows ACLs exist only on Windows")
    return ctypes.WinDLL("advapi32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]


def _fail(what: str) -> AclError:
    code = ctypes.get_last_error() if sys.platform == "win32" else 0  # type: ignore[attr-defined,unused-ignore]
    return AclError(f"{what} failed (Windows error {code})")


def _local_free(pointer: Any) -> None:
    ctypes.windll.kernel32.LocalFree(pointer)  # type: ignore[attr-defined,unused-ignore]


def current_user_sid() -> str:
    """The SID of the user this process runs as, e.g. S-1-5-21-...-1001."""
    advapi = _advapi()
    kernel = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    kernel.GetCurrentProcess.restype = ctypes.c_void_p
    token = ctypes.c_void_p()
    if not advapi.OpenProcessToken(
        ctypes.c_void_p(kernel.GetCurrentProcess()), _TOKEN_QUERY, ctypes.byref(token)
    ):
        raise _fail("OpenProcessToken")
    try:
        size = ctypes.c_ulong(0)
        advapi.GetTokenInformation(token, _TOKEN_USER, None, 0, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        if not advapi.GetTokenInformation(token, _TOKEN_USER, buffer, size, ctypes.byref(size)):
            raise _fail("GetTokenInformation")
        sid = ctypes.c_void_p.from_buffer(buffer).value  # TOKEN_USER.User.Sid
        text = ctypes.c_wchar_p()
        if not advapi.ConvertSidToStringSidW(ctypes.c_void_p(sid), ctypes.byref(text)):
            raise _fail("ConvertSidToStringSidW")
        try:
            return str(text.value)
        finally:
            _local_free(text)
    finally:
        kernel.CloseHandle(token)


def file_sddl(path: Path) -> str:
    """The owner and DACL of `path` as SDDL."""
    advapi = _advapi()
    descriptor = ctypes.c_void_p()
    info = _OWNER_SECURITY_INFORMATION | _DACL_SECURITY_INFORMATION
    status = advapi.GetNamedSecurityInfoW(
        str(path), _SE_FILE_OBJECT, info, None, None, None, None, ctypes.byref(descriptor)
    )
    if status != 0:
        raise AclError(f"cannot read the permissions of {path} (Windows error {status})")
    try:
        text = ctypes.c_wchar_p()
        if not advapi.ConvertSecurityDescriptorToStringSecurityDescriptorW(
            descriptor, _SDDL_REVISION_1, info, ctypes.byref(text), None
        ):
            raise _fail("ConvertSecurityDescriptorToStringSecurityDescriptorW")
        try:
            return str(text.value)
        finally:
            _local_free(text)
    finally:
        _local_free(descriptor)


def restrict_to_user(path: Path, *, directory: bool = False) -> None:
    """Replace the DACL of `path` by one protected entry: the current user, full control
    (inherited by what a directory will contain)."""
    advapi = _advapi()
    inherit = "OICI" if directory else ""
    sddl = f"D:P(A;{inherit};FA;;;{current_user_sid()})"
    descriptor = ctypes.c_void_p()
    if not advapi.ConvertStringSecurityDescriptorToSecurityDescriptorW(
        sddl, _SDDL_REVISION_1, ctypes.byref(descriptor), None
    ):
        raise _fail("ConvertStringSecurityDescriptorToSecurityDescriptorW")
    try:
        present, defaulted = ctypes.c_int(), ctypes.c_int()
        dacl = ctypes.c_void_p()
        if not advapi.GetSecurityDescriptorDacl(
            descriptor, ctypes.byref(present), ctypes.byref(dacl), ctypes.byref(defaulted)
        ):
            raise _fail("GetSecurityDescriptorDacl")
        info = _DACL_SECURITY_INFORMATION | _PROTECTED_DACL_SECURITY_INFORMATION
        status = advapi.SetNamedSecurityInfoW(
            str(path), _SE_FILE_OBJECT, info, None, None, dacl, None
        )
        if status != 0:
            raise AclError(f"cannot restrict the permissions of {path} (Windows error {status})")
    finally:
        _local_free(descriptor)


def readers_besides_user(path: Path) -> list[str]:
    """`other_readers` of the file as it is now, for the current user."""
    return other_readers(file_sddl(path), current_user_sid())
