"""`python -m fed_dplora.data prepare NAME OUT [--mirror DIR]`: the studies' public data,
pinned and checked (fed_dplora.data.public)."""

from __future__ import annotations

import argparse
import logging

from fed_dplora.data.public import PUBLIC, prepare
from fed_dplora.data.sources import DataError


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fed_dplora.data")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("name", choices=sorted(PUBLIC))
    parser.add_argument("out", help="folder to write the files into")
    parser.add_argument("--mirror", help="a local folder with the same files (offline)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(args.name, args.out, args.mirror)
    except DataError as err:
        raise SystemExit(f"prepare {args.name}: {err}") from None


if __name__ == "__main__":
    main()
