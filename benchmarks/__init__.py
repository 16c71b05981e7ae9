"""Benchmarks of jaxsft: training throughput against the seed's PyTorch loop, and scaling.

`python -m benchmarks.throughput` (one configuration, with the PyTorch baseline) and
`python -m benchmarks.scaling` (1, 2, 4, ... devices). Results live in benchmarks/results/.
"""
