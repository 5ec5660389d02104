"""The real CLI in a fresh process, as ``python -m diffusion_blend.cli ARGV`` runs it, forked
from a server that has already imported the package: a new interpreter spends most of a bad
input's two seconds importing torch and diffusers, a fork none."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read once, when the server loads torch
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["diffusion_blend.cli"])


def _main(argv: list[str], cwd: str, out: str, err: str) -> int:
    """In the child: the module's ``__main__`` with fds 1 and 2 on files; its exit code."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    sys.argv = ["dblend", *argv]
    try:
        runpy.run_module("diffusion_blend.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:        # the CLI exits with an int (None is 0)
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - an uncaught error: a traceback, as Python prints it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code)


def run_cli(*argv: str, cwd: Path | None = None, timeout: float = 120):
    """``subprocess.run``'s result for ``dblend ARGV`` run in a fresh forked process."""
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            1, mp_context=_CONTEXT, max_tasks_per_child=1) as pool:
        out, err = f"{tmp}/out", f"{tmp}/err"
        code = pool.submit(_main, list(argv), str(cwd or os.getcwd()), out, err).result(timeout)
        return subprocess.CompletedProcess(["dblend", *argv], code, Path(out).read_text(),
                                           Path(err).read_text())
