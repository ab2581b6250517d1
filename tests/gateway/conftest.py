"""Gateway tests run on both event loops: `relay gateway` runs under uvloop, whose TLS
transports behave differently from the standard loop's in ways that have bitten us."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
