from __future__ import annotations

import argparse

from benchmarks.cli import configure_parser, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmark llamapool against its baselines."
    )
    configure_parser(parser)
    return run(parser.parse_args())


raise SystemExit(main())
