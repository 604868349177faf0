"""``mapany-ros <command>``: one module per subcommand (process, eval, demo, prefetch), behind :mod:`.cli`."""
