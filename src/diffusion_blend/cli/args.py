"""What every command shares: argument types, the parser with the one-line error contract, the
``arg(...)`` argument specs, and printing results (JSON never holds NaN)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

from diffusion_blend.errors import UsageError

MAX_SEED = 2**64
MAX_THREADS = 1024

# ---------------------------------------------------------------------------- argument types
# argparse calls these on the raw text; an ArgumentTypeError becomes one line and exit code 2.


def finite_float(text: str) -> float:
    """A finite number (``inf`` and ``nan`` are refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; give a finite number")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (zero means zero, and zero of these is never allowed)."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; use a whole number >= 1")
    return v


def thread_count(text: str) -> int:
    """``--threads``: 1 ... 1024 (torch takes a C int; more threads than that is a typo)."""
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; use 1 ... {MAX_THREADS}")
    return v


def seed_int(text: str) -> int:
    """A seed: 0 <= seed < 2**64 (larger seeds would alias smaller ones)."""
    v = _int(text)
    if not 0 <= v < MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; seeds are 0 ... 2**64 - 1")
    return v


def port_int(text: str) -> int:
    v = _int(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; use 1 ... 65535")
    return v


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """``"0.3,0.7"`` -> ``(0.3, 0.7)``; anything else is a ``UsageError`` naming the flag."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} {text!r}: give comma-separated numbers, e.g. 0.3,0.7") from None
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"{name} {text!r} contains NaN or inf; values must be finite")
    return vals


def parse_finite(text: str, name: str) -> float:
    """One finite number, or a ``UsageError`` naming the flag."""
    vals = parse_floats(text, name)
    if len(vals) != 1:
        raise UsageError(f"{name} {text!r}: give one number")
    return vals[0]


# ---------------------------------------------------------------------------- the parser


def versions() -> str:
    """``dblend --version``: the project's version and its main dependencies'."""
    from importlib.metadata import PackageNotFoundError, version

    from diffusion_blend import __version__

    parts = [f"dblend {__version__}"]
    for pkg in ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors",
                "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


class VersionAction(argparse.Action):
    """``--version``: one unwrapped line on stdout, then exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(versions() + "\n")
        parser.exit(0)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def arg(*flags: str, **kw) -> tuple:
    """One argument spec: ``arg("--n", type=positive_int, default=10)``."""
    return flags, kw


OUT = arg("--out", required=True)
OVERWRITE = arg("--overwrite", action="store_true",
              help="replace an earlier output of this command (only what dblend wrote)")
SEED = arg("--seed", type=seed_int, default=0)
SPACING = arg("--spacing", default=None, choices=("linear", "quadratic"),
              help="how the chain spaces its steps (default: the domain's; digits "
              "quadratic, fashion linear)")
EXTRAPOLATE = arg("--allow-extrapolation", action="store_true",
                help="allow negative weights, lam > 1 and lam * sum(w) > 1")


def command(sub: Any, name: str, func: Callable, help: str, *specs: tuple,
            json: bool = True) -> argparse.ArgumentParser:
    """A subcommand with its arguments, plus ``--threads`` (and ``--json``) on every one."""
    p = sub.add_parser(name, help=help, description=help)
    for flags, kw in specs:
        p.add_argument(*flags, **kw)
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch threads (default 1)")
    if json:
        p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=func)
    return p


def domain_args(choices: tuple[str, ...], default: str) -> tuple:
    """``VERB [DOMAIN]`` or ``VERB --domain DOMAIN`` (see ``resolve_domain``)."""
    return (arg("domain", nargs="?", default=None, choices=choices, help=f"default {default}"),
            arg("--domain", dest="domain_flag", default=None, choices=choices))


def resolve_domain(a: argparse.Namespace, default: str) -> str:
    """The domain given once, either way, or ``default``; given twice, it must agree."""
    if a.domain and a.domain_flag and a.domain != a.domain_flag:
        raise UsageError(f"{a.domain} and --domain {a.domain_flag}: give the domain once")
    a.domain = a.domain or a.domain_flag or default
    return a.domain


def domains(sub: Any, verb: str, help: str) -> Any:
    """``dblend VERB DOMAIN``: the subparsers of one verb, one per domain."""
    return sub.add_parser(verb, help=help, description=help).add_subparsers(
        dest=f"{verb}_domain", required=True, metavar="DOMAIN")


# ---------------------------------------------------------------------------- running


def threads(n: int | None) -> None:
    """Small tensors run fastest on one thread on these machines (OpenMP wake-up costs)."""
    import torch

    torch.set_num_threads(n or 1)


def check_result(summary: dict) -> None:
    """A result with NaN or infinite numbers is an error, never printed or saved."""
    from diffusion_blend.io import check_finite_json

    check_finite_json(summary, "the result")


def emit(obj: dict, as_json: bool) -> None:
    """Print a result: one JSON object, or ``key: value`` lines."""
    from diffusion_blend.io import dumps

    text = dumps(obj, where="the result")   # NaN or infinity is an error, also without --json
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        for k, v in obj.items():
            sys.stdout.write(f"{k}: {v}\n")
