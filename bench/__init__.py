"""Throughput benchmark harness: `python -m bench` (or `make bench`); see docs/benchmarks.md.

It measures, on one machine and the same N images, the compute limit of the chosen backbones,
a plain script as the paper would have run it, and leukoflow end to end, plus the side goals
(memory growth, color_morphology speed, join + train at scale, the nightly sweep). Every section
runs in a fresh child process, so each is timed from a cold start and its memory is its own.
"""
