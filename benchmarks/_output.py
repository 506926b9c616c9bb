"""Where a benchmark writes its results.

Tracked results (``benchmarks/results/``) are rewritten only on request
(``--write``) or into a folder given with ``--out``; by default results go
to ``benchmarks/results/local/``, which git ignores, so that trying a
benchmark never changes tracked files.
"""

from __future__ import annotations

import argparse
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOCAL = os.path.join(RESULTS, "local")


def make_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
  """A parser with ``--quick``, ``--seeds`` and the output options."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default 3; 1 with --quick)")
  add_arguments(parser)
  return parser


def seeds(args: argparse.Namespace) -> list[int]:
  return list(range(1 if args.quick else (args.seeds or 3)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_mutually_exclusive_group()
  group.add_argument(
      "--write", action="store_true",
      help=f"write the tracked results in {RESULTS}")
  group.add_argument(
      "--out", default=None,
      help=f"write the results in this folder (default: {LOCAL}, ignored "
      "by git)")


def directory(args: argparse.Namespace) -> str:
  """The folder for the results (created if needed)."""
  path = RESULTS if args.write else (args.out or LOCAL)
  os.makedirs(path, exist_ok=True)
  return path
