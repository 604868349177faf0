"""`mapany-ros <command>`: the package's command-line tools behind one entry point."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prefetch": ("mapany_ros.commands.prefetch", "fill an offline cache with MapAnything weights and DINOv2 hub code"),
    "demo": ("mapany_ros.commands.demo", "run the node on the synthetic robot and score it against ground truth "
             "(--bag DIR: write the synthetic robot as a bag with ground truth instead; --loops N: N loops with "
             "drifting odometry and a simulated model, with and without loop closure)"),
    "process": ("mapany_ros.commands.process", "reconstruct a recorded bag offline into an output bag "
                "(+ PLY, TUM, rerun)"),
    "eval": ("mapany_ros.commands.eval", "score a result bag's trajectory and depth against a ground-truth bag"),
    "bench": ("mapany_ros.bench", "measure the node's own overhead; writes docs/benchmarks.md"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mapany-ros <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
