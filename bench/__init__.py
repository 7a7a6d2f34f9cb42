"""Benchmarks: `musiq bench` (the side-by-side harness, `bench.run`) and stand-alone scripts."""
