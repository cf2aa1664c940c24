"""Benchmarks (`python -m bench.<name>`): each prints a table and writes reports/bench_*.json."""

from __future__ import annotations

# The CPU model and core count, written beside every speed a bench reports.
from stages.common import cpu_model as cpu_name

__all__ = ["cpu_name"]
