"""`LinkSettings`: what one side of a link announces and enforces, and its bounds.

It is also the `limits:` section of every role's config file (relay.ops.config reads it),
so its bounds are the config's bounds: a bad value raises `FieldError`, whose `field` is
the YAML key and whose message is written for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from relay.proto import frames as fr

__all__ = [
    "MAX_ANNOUNCED_FRAME",
    "MAX_KEEPALIVE_INTERVAL",
    "MAX_STREAMS_RANGE",
    "FieldError",
    "LinkSettings",
    "format_size",
]

# The largest frame we announce. The protocol lets a peer announce up to 16 MiB (and we
# send it frames that big if it asks), but the decoder holds one whole frame per link in
# memory: 1 MiB per link bounds that, and larger frames were measured to gain nothing
# (docs/BENCHMARKS.md).
MAX_ANNOUNCED_FRAME: Final = 1024 * 1024
MAX_STREAMS_RANGE: Final = (1, 65535)
MAX_KEEPALIVE_INTERVAL: Final = 86400.0


class FieldError(ValueError):
    """A value of a settings dataclass is out of bounds; `field` is its key in the config
    file's section (config loaders turn it into `file: section.key: message`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def format_size(size: int) -> str:
    """The shortest exact spelling of `size` in binary units ("64KiB", "1MiB", "65537")."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What this side announces and enforces (YAML `limits:`; see relay/PROTOCOL.md).

    The windows should be at least the bandwidth-delay product of the slowest path that
    must run at full speed: 1 MiB per stream covers 80 Mbit/s at 100 ms.
    """

    stream_window: int = 1024 * 1024
    link_window: int = 16 * 1024 * 1024
    max_frame: int = 64 * 1024
    max_streams: int = 256
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0

    def __post_init__(self) -> None:
        lowest = fr.DEFAULT_STREAM_WINDOW
        for name in ("stream_window", "link_window"):
            window = getattr(self, name)
            if not lowest <= window <= fr.MAX_WINDOW:
                raise FieldError(
                    name,
                    f"expected a size {format_size(lowest)}-{fr.MAX_WINDOW}, "
                    f"got {format_size(window)}",
                )
        if self.link_window < self.stream_window:
            raise FieldError(
                "link_window",
                f"must be at least stream_window ({format_size(self.stream_window)}), "
                f"got {format_size(self.link_window)}",
            )
        if not fr.MIN_MAX_FRAME <= self.max_frame <= MAX_ANNOUNCED_FRAME:
            raise FieldError(
                "max_frame",
                f"expected a size {format_size(fr.MIN_MAX_FRAME)}-"
                f"{format_size(MAX_ANNOUNCED_FRAME)}, got {format_size(self.max_frame)}",
            )
        low, high = MAX_STREAMS_RANGE
        if not low <= self.max_streams <= high:
            raise FieldError(
                "max_streams", f"expected an integer {low}-{high}, got {self.max_streams}"
            )
        if not 0 < self.keepalive_interval <= MAX_KEEPALIVE_INTERVAL:
            raise FieldError(
                "keepalive_interval",
                f"expected a duration above 0 and up to 1d, got {self.keepalive_interval}",
            )
        if self.keepalive_timeout <= self.keepalive_interval:
            raise FieldError(
                "keepalive_timeout",
                f"must be longer than keepalive_interval ({self.keepalive_interval}s), "
                f"got {self.keepalive_timeout}s",
            )
