"""The gateway's config file read from disk: the one gateway module that parses YAML.

The service never imports it: `relay gateway` passes `load_gateway_config` to
gateway.service.run, which uses it at start-up and on SIGHUP.
"""

from __future__ import annotations

import os

from gateway.config import GatewayConfig, read_gateway_config
from relay.ops.configfile import load_config

__all__ = ["load_gateway_config"]


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and check a gateway config file; raises relay.ops.config.ConfigError."""
    return load_config(path, read_gateway_config)
