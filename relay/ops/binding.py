"""Turn a listen failure (port taken, address not ours) into the config error it is.

A role binds the addresses its config names; when one cannot be bound the operator must
fix that key, so the failure is reported as a one-line ConfigError naming file and key,
not as an OSError traceback (and an OSError elsewhere stays a bug that shows its
traceback).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from relay.ops.config import ConfigError

__all__ = ["listen_errors"]


@contextmanager
def listen_errors(file: str | os.PathLike[str], key: str, address: object) -> Iterator[None]:
    """Within the block, an OSError becomes ConfigError(file, key, "cannot listen on ...")."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(file, key, f"cannot listen on {address}: {reason}") from None
