"""python -m tunefleet.demo [--quick] [--data-dir DIR | --target ADDRESS [--metrics-url URL]
[--openai-url URL]]"""

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
    parser.add_argument(
        "--target",
        default="",
        help="run the tour on services already running at this address (a gateway, or "
        "`tunefleet serve`) instead of starting one; they must serve the plan's base model",
    )
    parser.add_argument("--metrics-url", default="", help="InferenceService's /metrics, shown")
    parser.add_argument(
        "--openai-url", default="", help="the OpenAI-compatible API's /v1, asked once (openai)"
    )
    args = parser.parse_args()
    return run(args.quick, args.data_dir, args.target, args.metrics_url, args.openai_url)


if __name__ == "__main__":
    sys.exit(main())
