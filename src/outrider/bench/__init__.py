"""Spec-Bench-protocol harness: datasets, the method runner, metrics and reports (`outrider bench`)."""

from outrider.bench.cli import build_parser, run_bench, run_from_args
from outrider.bench.runner import BenchConfig

__all__ = ["BenchConfig", "build_parser", "run_bench", "run_from_args"]
