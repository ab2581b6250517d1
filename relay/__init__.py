"""DMZ Relay: remote radiology reading through a stateless DMZ gateway."""

__version__ = "0.1.0"
