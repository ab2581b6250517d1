"""Benchmarks of issue 2 (throughput, idle-link memory, handshake rate) and their tools.

Never collected by pytest (see norecursedirs); run with `make bench`, which writes the
results to docs/BENCHMARKS.md. Every benchmark starts its own processes on 127.0.0.1,
bounds its run time and kills what it started.
"""
