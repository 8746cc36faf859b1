"""The full benchmark run (``python bench/run_bench.py``): seeded workloads, the runner, the report renderer."""
