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
    "MAX_PACS_TIMEOUT",
    "RETRIEVE_CHOICES",
    "PacsTarget",
    "Retrieve",
]

Retrieve = Literal["get", "move"]
RETRIEVE_CHOICES: Final[tuple[Retrieve, ...]] = ("get", "move")

# Where the storage SCP for `retrieve: move` listens unless set: any free loopback port.
DEFAULT_MOVE_LISTEN: Final = Address("127.0.0.1", 0)
MAX_PACS_TIMEOUT: Final = 3600.0


@dataclass(frozen=True)
class PacsTarget:
    """The PACS the agent queries and retrieves from, and how.

    `retrieve` "move" makes the agent ask the PACS for a C-MOVE to `move_ae_title`, which
    the agent's own storage SCP answers on `move_listen` (the PACS must know that AE
    title and address; unset, any free loopback port). With "get", `move_listen` is None
    unless set. `timeout` is seconds for every wait on the PACS: connect, association,
    each response. The last three fields are not `pacs:` keys: `compression_level` is the
    agent's top-level key, `stall_timeout` bounds how long a retrieve waits for the
    workstation to read, `survey` C-FINDs a study before retrieving it (counts, SOP
    classes).
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "RELAY"
    retrieve: Retrieve = "get"
    move_ae_title: str = "RELAYAGENT"
    move_listen: Address | None = None
    timeout: float = 30.0
    compression_level: int = 3
    stall_timeout: float = 120.0
    survey: bool = True

    def __post_init__(self) -> None:
        if self.retrieve not in RETRIEVE_CHOICES:
            raise FieldError("retrieve", f"expected one of get, move; got {self.retrieve!r}")
        if not 0 < self.timeout <= MAX_PACS_TIMEOUT:
            raise FieldError("timeout", f"expected a duration above 0s to 1h, got {self.timeout}")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {self.stall_timeout}")
        if self.retrieve == "move":
            if not self.move_ae_title:
                raise FieldError("move_ae_title", "retrieve: move needs an AE title")
            if self.move_listen is None:
                object.__setattr__(self, "move_listen", DEFAULT_MOVE_LISTEN)

    @property
    def address(self) -> Address:
        """The PACS's DICOM endpoint."""
        return Address(self.host, self.port)
