"""Scoring against ground truth: depth, point, map and trajectory metrics, the node's collected outputs,
and the pictures and files a person looks at. Shared by ``eval``, the demo, the tests and the benchmarks."""
