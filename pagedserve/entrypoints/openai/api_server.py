"""`python -m pagedserve.entrypoints.openai.api_server --model ...`: the guides' `python -m
vllm.entrypoints.openai.api_server` line with our name. The same arguments as `pagedserve serve`."""
from __future__ import annotations

import argparse
import sys

from pagedserve.cli.main import build_parser, main


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
