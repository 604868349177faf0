"""``make bench`` (``python -m mapany_ros.bench``): one module per benchmark, written to docs/benchmarks.md."""
