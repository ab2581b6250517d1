"""`sitecustomize` for the first-image tracer (tests/bench/first_trace.py): on the PYTHONPATH of
the processes it starts, nowhere else."""
