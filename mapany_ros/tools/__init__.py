"""Command-line tools: the demo, the synthetic source, the recorder, benchmarks, prefetch."""
