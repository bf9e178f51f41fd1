"""Benchmarks (`make bench`): each module measures a stage against a baseline in the same run.

A benchmark module exposes `run(args) -> list[Row]`; rows are printed as one table and written to
`runs/bench/results.json`. Ratios, not absolute times, are what the targets are stated in.
"""
