"""Output directories and atomic writes: a file is either complete or absent, never half-written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusion_blend.errors import UsageError


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create ``path``; refuse an existing non-empty directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {path} is not empty; choose another directory or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` (dataclasses allowed) as indented JSON, atomically."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(path: str | Path, state: dict, meta: dict) -> dict:
    """``NAME.safetensors`` plus ``NAME.json`` (``meta`` and the weights' sha256), both atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(state, p))
    meta = meta | {"sha256": sha256_file(path)}
    write_json(path.with_suffix(".json"), meta)
    return meta


def load_weights(path: str | Path, recipe: str) -> tuple[dict, dict]:
    """Load a weight file after checking it against its JSON's sha256; a missing or corrupt
    file is a ``UsageError`` naming the file and the ``recipe`` command that makes it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, meta_path = Path(path), Path(path).with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise UsageError(f"weight file {path} (or its .json) is missing; create it with "
                         f"`{recipe}`")
    meta = json.loads(meta_path.read_text())
    if sha256_file(path) != meta.get("sha256"):
        raise UsageError(f"weight file {path} is corrupt (sha256 differs from {meta_path.name});"
                         f" recreate it with `{recipe}`")
    try:
        return load_file(path), meta
    except SafetensorError as e:
        raise UsageError(f"weight file {path} could not be read ({e}); recreate it with "
                         f"`{recipe}`") from None
