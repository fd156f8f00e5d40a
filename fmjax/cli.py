"""The ``fmjax`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fmjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="exact GMM -> GMM transport in 2-D, with a figure")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fmjax.experiments import exact_demo

        exact_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
