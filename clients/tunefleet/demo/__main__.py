"""python -m tunefleet.demo [--quick] [--data-dir DIR]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunefleet.demo.tour import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefleet.demo", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random model instead of SmolLM2 (< 2 min)"
    )
    parser.add_argument("--data-dir", type=Path, help="where the server keeps its data")
    args = parser.parse_args()
    return run(quick=args.quick, data_dir=args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
