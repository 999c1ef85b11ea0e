"""`python -m tests.mutants [--group G ...] [--mutant NAME ...] [--report FILE]`: apply
each registered mutant to a copy of the repository and check its tests kill it (exit 1
when any survives, no longer applies, or its tests do not pass unpatched)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from . import GROUPS
from .runner import run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__)
    parser.add_argument("--group", action="append", choices=sorted(GROUPS),
                        help="the groups to run (default: every group)")
    parser.add_argument("--mutant", action="append", default=[],
                        help="only the mutants whose names start with this")
    parser.add_argument("--report", type=Path, help="write each verdict to this JSON file")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a mutant's tests may run (default 600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mutants = [m for g in (args.group or sorted(GROUPS)) for m in GROUPS[g]
               if not args.mutant or any(m.name.startswith(n) for n in args.mutant)]
    if not mutants:
        raise SystemExit(f"no mutant matches --mutant {args.mutant}")
    problems, verdicts = run(mutants, args.timeout)
    for problem in problems:
        logging.error("baseline: %s", problem)
    if args.report:
        args.report.write_text(json.dumps([asdict(v) for v in verdicts], indent=1) + "\n")
    bad = [v for v in verdicts if not v.ok]
    logging.info("%d mutants: %d killed, %d not", len(verdicts), len(verdicts) - len(bad),
                 len(bad))
    return 1 if problems or bad else 0


if __name__ == "__main__":
    sys.exit(main())
