"""The ``kvstore bench`` full run: seeded workloads, the runner, and the report renderer (``kvbench.report``)."""
