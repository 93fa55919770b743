"""Benchmarks of the Run data layer: cost over the raw driver, scaling, migration, throughput.

Run everything with ``.venv/bin/python -m benchmarks`` (``--help`` for sizes);
the report is printed and written to ``reports/benchmarks.md``. Benchmarks are
not tests: nothing here asserts a timing, it measures and reports against the
targets of the benchmarks issue.
"""
