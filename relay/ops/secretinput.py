"""A password read from bytes (a file, stdin), the one way every command reads one.

Text-mode stdin decodes with the console's code page on Windows, and Windows tools write
files as UTF-16 or as UTF-8 with a byte order mark (PowerShell 5.1's `>` and Out-File,
Notepad's "Unicode"). A password altered on the way is a wrong password that looks
right: so the bytes are decoded by their BOM (UTF-8 without one), and a line that cannot
be what the user typed (a control character, a BOM inside it, U+FFFD, bytes that are
not UTF-8) is refused with one line saying why. Used by `relay enroll` and `relay
it-admin passwd`.
"""

from __future__ import annotations

import codecs
import unicodedata
from typing import BinaryIO, Final, Protocol

__all__ = ["Lines", "SecretInputError", "SecretReader", "read_secret_line", "without_newline"]

_BOMS: Final = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class SecretInputError(ValueError):
    """The secret cannot be what the user typed; one line, never the secret itself."""


class Lines(Protocol):
    """What a password or a code is read from: `SecretReader`, or a text stream."""

    def readline(self, size: int = -1, /) -> str: ...


class SecretReader:
    """Lines of text from bytes (a password file, stdin), decoded by their byte order
    mark: UTF-8 without one, UTF-8, UTF-16 LE or BE with one. Not the console's code
    page, which text-mode stdin would use on Windows.

    Reads a byte at a time (a few hundred at most) so that two secrets (an enrollment
    code, then a password) can come one after the other from the same stdin.
    Undecodable bytes raise UnicodeDecodeError."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decoder: codecs.IncrementalDecoder | None = None
        self._pending = ""

    def readline(self, size: int = -1, /) -> str:
        """The next line with its newline; at most `size` characters (all if negative)."""
        if self._decoder is None:
            self._decoder = self._start()
        while "\n" not in self._pending and (size < 0 or len(self._pending) < size):
            byte = self._raw.read(1)
            self._pending += self._decoder.decode(byte, final=not byte)
            if not byte:
                break
        end = self._pending.find("\n") + 1 or len(self._pending)
        if size >= 0:
            end = min(end, size)
        line, self._pending = self._pending[:end], self._pending[end:]
        return line

    def _start(self) -> codecs.IncrementalDecoder:
        head = b""
        for bom, encoding in _BOMS:
            while len(head) < len(bom) and bom.startswith(head):
                byte = self._raw.read(1)
                if not byte:
                    break
                head += byte
            if head == bom:
                return codecs.getincrementaldecoder(encoding)("strict")
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._pending = decoder.decode(head)
        return decoder


def without_newline(text: str) -> str:
    """Only the line's end ("\n" or "\r\n"): the rest is the secret, as typed."""
    text = text.removesuffix("\n")
    return text.removesuffix("\r")


def refuse_garbled(secret: str, where: str) -> None:
    """Raise SecretInputError if `secret` holds a character no one types in a password."""
    for char in secret:
        if char in ("\ufeff", "\ufffd") or unicodedata.category(char) == "Cc":
            raise SecretInputError(
                f"the password from {where} contains U+{ord(char):04X} (a control character, "
                "a byte order mark or an undecodable byte): not used; write it as UTF-8 or "
                "UTF-16 text, on one line"
            )


def read_secret_line(source: Lines, where: str, max_chars: int) -> str:
    """The first line of `source` (a SecretReader) without its line end, checked: at most
    `max_chars` characters, decodable, nothing garbled. Empty if there was none (the
    caller says what was missing). Raises SecretInputError naming `where`."""
    try:
        text = source.readline(max_chars + 2)
    except UnicodeDecodeError:
        raise SecretInputError(
            f"the password from {where} is not UTF-8 or UTF-16 text (save it as UTF-8)"
        ) from None
    secret = without_newline(text)
    if len(secret) > max_chars:
        raise SecretInputError(f"the password is longer than {max_chars} characters")
    refuse_garbled(secret, where)
    return secret
