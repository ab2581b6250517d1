"""`PacsTarget`: the agent's `pacs:` config section, and what the PACS operations use.

One type for both, so that a default or a bound cannot differ between the file and the
code. It imports no DICOM library: loading the agent's config stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from relay.ops.config import Address, FieldError

__all__ = [
    "DEFAULT_MOVE_LISTEN",
    "MAX_CODEC_WORKERS",
    "MAX_MOVE_SENDERS",
    "MAX_PACS_TIMEOUT",
    "MAX_SPARE_ASSOCIATION",
    "PIXEL_CODEC_CHOICES",
    "RETRIEVE_CHOICES",
    "PacsTarget",
    "Retrieve",
]

Retrieve = Literal["get", "move"]
PixelCodecs = Literal["auto", "off", "jpegls", "htj2k", "jpegxl"]
PIXEL_CODEC_CHOICES: Final[tuple[PixelCodecs, ...]] = ("auto", "off", "jpegls", "htj2k", "jpegxl")
MAX_CODEC_WORKERS: Final = 16
RETRIEVE_CHOICES: Final[tuple[Retrieve, ...]] = ("get", "move")

# Where the storage SCP for `retrieve: move` listens unless set: any free loopback port.
DEFAULT_MOVE_LISTEN: Final = Address("127.0.0.1", 0)
MAX_PACS_TIMEOUT: Final = 3600.0
MAX_MOVE_SENDERS: Final = 64  # entries in move_senders and in move_sender_ae_titles
# A spare association idles at most this long: PACSes close idle associations (Orthanc
# after 30 s by default), and one held longer helps no burst of requests.
MAX_SPARE_ASSOCIATION: Final = 60.0


@dataclass(frozen=True)
class PacsTarget:
    """The PACS the agent queries and retrieves from, and how.

    `retrieve` "move" makes the agent ask the PACS for a C-MOVE to `move_ae_title`, which
    the agent's own storage SCP answers on `move_listen` (the PACS must know that AE
    title and address; unset, any free loopback port), and takes C-STOREs there only from
    `move_senders` calling as `move_sender_ae_titles` (unset: the PACS's `host` and
    `ae_title`). With "get", `move_listen` is None unless set. `timeout` is seconds for
    every wait on the PACS: connect, association, each response. The last three fields
    are not `pacs:` keys: `compression_level` is the agent's top-level key,
    `stall_timeout` bounds how long a retrieve waits for the workstation to read,
    `survey` C-FINDs a study beside retrieving it (counts, SOP classes;
    relay.dicom.survey).
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "RELAY"
    retrieve: Retrieve = "get"
    move_ae_title: str = "RELAYAGENT"
    move_listen: Address | None = None
    # Who may send the C-MOVE's C-STOREs to `move_listen` (relay.dicom.intake): host
    # names, addresses or networks, and calling AE titles. Empty: `host` and `ae_title`,
    # for a PACS that sends from another address or AE title than it is queried at.
    move_senders: tuple[str, ...] = ()
    move_sender_ae_titles: tuple[str, ...] = ()
    timeout: float = 30.0
    compression_level: int = 3
    stall_timeout: float = 120.0
    survey: bool = True
    # Transport codecs for native pixel data (docs/internals/codecs.md): "auto" lets the
    # agent choose per instance between zstd, JPEG-LS, HTJ2K and JPEG XL by measured rates; "off"
    # is zstd only; a codec name sends every instance it can take in that codec, whatever
    # the link (the fewest bytes; and what the tests use to force a codec).
    pixel_codecs: PixelCodecs = "auto"
    codec_workers: int = 2  # encoder threads shared by all streams
    # Seconds an association opened after a request may wait for the next (0: none;
    # relay.dicom.spare): the next query or retrieve skips associating.
    spare_association: float = 20.0

    @property
    def allowed_codecs(self) -> tuple[str, ...]:
        if self.pixel_codecs == "off":
            return ()
        if self.pixel_codecs == "auto":
            return ("jpegls", "htj2k", "jpegxl")
        return (self.pixel_codecs,)

    def __post_init__(self) -> None:
        if self.retrieve not in RETRIEVE_CHOICES:
            raise FieldError("retrieve", f"expected one of get, move; got {self.retrieve!r}")
        if not 0 < self.timeout <= MAX_PACS_TIMEOUT:
            raise FieldError("timeout", f"expected a duration above 0s to 1h, got {self.timeout}")
        if self.pixel_codecs not in PIXEL_CODEC_CHOICES:
            raise FieldError("pixel_codecs", f"expected auto, off, jpegls, htj2k or jpegxl, got "
                             f"{self.pixel_codecs!r}")  # fmt: skip
        if not 1 <= self.codec_workers <= MAX_CODEC_WORKERS:
            raise FieldError("codec_workers", f"expected 1 to {MAX_CODEC_WORKERS}")
        if not 0 <= self.spare_association <= MAX_SPARE_ASSOCIATION:
            raise FieldError("spare_association", "expected a duration from 0s to 1m")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {self.stall_timeout}")
        if self.retrieve == "move":
            if not self.move_ae_title:
                raise FieldError("move_ae_title", "retrieve: move needs an AE title")
            if self.move_listen is None:
                object.__setattr__(self, "move_listen", DEFAULT_MOVE_LISTEN)
        for name in ("move_senders", "move_sender_ae_titles"):
            if len(getattr(self, name)) > MAX_MOVE_SENDERS:
                raise FieldError(name, f"expected at most {MAX_MOVE_SENDERS} entries")

    @property
    def address(self) -> Address:
        """The PACS's DICOM endpoint."""
        return Address(self.host, self.port)
