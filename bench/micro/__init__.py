"""Micro-benchmarks, each `python -m bench.micro.<name>`: the mask's and the recorder's overhead, the FP8 recorder's
memory, server start-up, the pruner's throughput, and stock engines' fallback routing."""
