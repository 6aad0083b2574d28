"""Benchmarks: side-by-side measurements, never assertions (see docs/performance.md)."""
