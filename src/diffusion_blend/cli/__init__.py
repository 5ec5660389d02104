"""``dblend VERB DOMAIN``: the command line, one module per verb.

Bad input ends with one line on stderr and exit code 2 (``UsageError``, and argparse's own
errors); a run whose loss or weights became non-finite ends with one line and exit code 1.
Every hub-library call runs offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from diffusion_blend.cli import (
    bench,
    convert,
    demo,
    distill,
    finetune,
    sample,
    sweep,
    train_base,
    ui,
)
from diffusion_blend.cli.args import Parser, VersionAction
from diffusion_blend.errors import DivergedError, UsageError

VERBS = (sample, finetune, train_base, distill, sweep, bench, demo, ui, convert)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dblend", description="Diffusion Blend: inference-time multi-preference "
               "alignment of diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action=VersionAction, nargs=0,
                   help="print the versions of dblend and its main dependencies")
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")
    for verb in VERBS:
        verb.register(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 1 when a run diverged, 2 for bad input)."""
    from diffusion_blend.offline import hub_offline

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:    # --help, --version (0) or a bad flag (2): already written
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with hub_offline():
            args.func(args)
    except UsageError as e:
        sys.stderr.write(f"dblend: error: {_one_line(e)}\n")
        return 2
    except DivergedError as e:
        sys.stderr.write(f"dblend: error: {_one_line(e)}\n")
        return 1
    return 0
