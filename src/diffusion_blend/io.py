"""Output locations and atomic writes: a file is either complete or absent, never half-written.

Every output directory this tool creates holds a marker (``.dblend-output.json``: kind and
version). ``--overwrite`` empties only a directory with the marker of the same kind; anything
else is refused, so a user's folder is never deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion_blend.errors import NonFiniteError, UsageError

MARKER = ".dblend-output.json"
MARKER_VERSION = 1


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (``os.umask`` can only
    read by setting, which would race with other threads creating files, e.g. the UI's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_writable_dir(folder: Path, path: Path, flag: str) -> None:
    """``folder`` must be an existing directory this process can create files in."""
    if not folder.exists():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


def read_marker(path: str | Path) -> dict | None:
    """The marker of a directory this tool wrote, or ``None``."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "kind" in marker else None


def check_out_dir(path: str | Path, overwrite: bool = False, kind: str = "output",
                  flag: str = "--out") -> Path:
    """Validate an output directory without creating or deleting anything."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(f"{flag} {path} is not empty; choose another directory or pass "
                             "--overwrite")
        marker = read_marker(path)
        if marker is None:
            raise UsageError(f"--overwrite: {path} was not written by dblend (no {MARKER}); "
                             "refusing to delete it")
        if marker["kind"] != kind:
            raise UsageError(f"--overwrite: {path} holds dblend {marker['kind']!r} output, not "
                             f"{kind!r}; refusing to delete it")
    return check_out_folder(path, flag)


def check_out_file(path: str | Path, suffix: str | None = None, flag: str = "--out") -> Path:
    """Validate an output file path (suffix, not a directory, writable parent) up front."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: give a {suffix} path")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    _check_writable_dir(Path(os.path.abspath(path)).parent, path, flag)
    return path


def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """A directory that files will be added to (nothing is deleted): an existing writable
    directory, or a new one in an existing writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory")
    folder = path if path.is_dir() else Path(os.path.abspath(path)).parent
    _check_writable_dir(folder, path, flag)
    return path


def prepare_out_dir(path: str | Path, overwrite: bool = False, kind: str = "output",
                    flag: str = "--out") -> Path:
    """Create ``path`` with this tool's marker; with ``overwrite``, empty a directory of the
    same ``kind`` that this tool wrote (anything else is refused by ``check_out_dir``)."""
    path = check_out_dir(path, overwrite, kind, flag)
    if path.is_dir():
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind)
    return path


def write_marker(path: Path, kind: str) -> None:
    """Mark ``path`` as this tool's output of ``kind`` (what ``--overwrite`` may empty)."""
    from diffusion_blend import __version__

    write_json(path / MARKER, {"kind": kind, "version": MARKER_VERSION, "dblend": __version__})


def atomic_write(path: str | Path, write: Callable[[Path], None], exclusive: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, then move it into
    place with the umask's mode. ``exclusive``: fail with ``FileExistsError`` rather than
    replace an existing file (also against concurrent writers)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)    # atomic, and refuses an existing name
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def fsync_dir_files(folder: str | Path) -> None:
    """Flush every file in ``folder`` to disk (before the folder is renamed into place)."""
    for p in Path(folder).iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def check_finite_json(obj: Any, where: str = "output") -> None:
    """Refuse NaN or infinite numbers anywhere in ``obj`` (JSON has no spelling for them)."""
    dumps(obj, where=where)


def _first_non_finite(obj, key: str = "") -> str:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{key or 'value'}={obj}"
    items = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, list | tuple) else ())
    for k, v in items:
        found = _first_non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return ""


def dumps(obj: Any, where: str = "output", **kw) -> str:
    """``json.dumps`` that refuses NaN / infinity with a one-line error naming the value."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        found = _first_non_finite(obj)
        if not found:   # another ValueError (a circular reference): not ours to rename
            raise
        raise NonFiniteError(f"{where} contains NaN or infinite values ({found}); refusing to "
                             "write them") from None


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (dataclasses allowed) as indented JSON, atomically; no NaN or infinity."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from ``path``; a missing, truncated or non-object file is a ``UsageError``."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read ({e.strerror})") from None
    except ValueError:
        raise UsageError(f"{what} {path} is not valid JSON (truncated or corrupt)") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object")
    return obj


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def image_row(images: Any, scale: int = 1) -> Any:
    """Images ``[N, C, H, W]`` in [0, 1] (C = 1 or 3) side by side as one PIL image (diffusers'
    ``make_image_grid``), each pixel drawn ``scale`` times larger."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    pix = (images.detach().clamp(0, 1) * 255).round().byte().cpu()
    mode = "L" if pix.shape[1] == 1 else "RGB"
    pil = [Image.fromarray(p[0].numpy() if mode == "L" else p.permute(1, 2, 0).numpy(), mode)
           for p in pix]
    row = make_image_grid(pil, rows=1, cols=len(pil))
    return row.resize((row.width * scale, row.height * scale), Image.NEAREST) if scale > 1 else row


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_finite_tensors(state: dict, where: str) -> None:
    """Refuse weights with NaN or infinite entries (a diverged run must not be saved or used)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise NonFiniteError(f"{where}: tensor {name!r} has NaN or infinite values")


def save_weights(path: str | Path, state: dict, meta: dict) -> dict:
    """``NAME.safetensors`` plus ``NAME.json`` (``meta`` and the weights' sha256), both atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    check_finite_tensors(state, f"weights for {path}")
    atomic_write(path, lambda p: save_file(state, p))
    meta = meta | {"sha256": sha256_file(path)}
    write_json(path.with_suffix(".json"), meta)
    return meta


def load_safetensors(path: str | Path, what: str = "weight file", fix: str = "") -> dict:
    """A safetensors file's tensors; garbage, truncation or non-finite values are a
    ``UsageError`` naming the file (``fix`` says how to recreate it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{what} {path} could not be read ({str(e).splitlines()[0]}){fix}") \
            from None
    check_finite_tensors(state, f"{what} {path}")
    return state


def load_weights(path: str | Path, recipe: str) -> tuple[dict, dict]:
    """Load a weight file after checking it against its JSON's sha256; a missing or corrupt
    file is a ``UsageError`` naming the file and the ``recipe`` command that makes it."""
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise UsageError(f"weight file {path} (or its .json) is missing; create it with "
                         f"`{recipe}`")
    meta = read_json(meta_path, "weight metadata")
    if sha256_file(path) != meta.get("sha256"):
        raise UsageError(f"weight file {path} is corrupt (sha256 differs from {meta_path.name});"
                         f" recreate it with `{recipe}`")
    return load_safetensors(path, "weight file", f"; recreate it with `{recipe}`"), meta


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (``MemAvailable``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_memory(nbytes: float, what: str) -> None:
    """Refuse work whose estimated memory exceeds what is available, before it starts."""
    have = available_memory()
    if nbytes > have:
        raise UsageError(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, "
                         f"{have / 2**30:.1f} GiB are available; ask for fewer samples")


def read_state_dict(path: str | Path, what: str) -> dict:
    """Tensors by name from ``.safetensors`` or a torch file read with ``weights_only=True``
    (never an arbitrary pickle); anything unreadable or not a dict of tensors is a
    ``UsageError`` naming the file."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path, what)
        if not state:
            raise UsageError(f"{what} {path} holds no tensors")
        return state
    try:
        with warnings.catch_warnings():   # torch's notes on a file's pickle protocol
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types here (pickle, zip, EOF, runtime)
        raise UsageError(f"{what} {path} is not a readable state dict ({type(e).__name__}); it "
                         "must be a .safetensors file or a torch file holding only tensors") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UsageError(f"{what} {path} does not hold a state dict (names -> tensors)")
    check_finite_tensors(state, f"{what} {path}")
    return state
