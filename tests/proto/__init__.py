"""Tests of the sans-I/O relay protocol core (relay.proto)."""
