"""Corral's benchmarks: each one measures a figure beside a reference measured in the same run.

``python -m bench`` runs them all and rewrites ``docs/benchmarks.md``; each module also runs
alone (``python -m bench.connections --devices 1000``, ``python -m bench.registry``) and has a
``--quick`` smoke mode (small N, results kept apart, docs left alone). Shared helpers (server
processes, percentiles, result files, the report) are in :mod:`bench.common`.
"""
