"""`python -m placement ...` runs `triptych plan` without the top-level CLI."""

import argparse
import sys

from placement import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m placement", description="goodput-optimal placement planner")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
