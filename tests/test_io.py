"""Output directories, atomic writes and JSON: what ``--overwrite`` may delete, file modes,
exclusive creation, and no NaN in JSON."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diffusion_blend.errors import NonFiniteError, UsageError
from diffusion_blend.io import (
    MARKER,
    atomic_write,
    dumps,
    prepare_out_dir,
    read_json,
    save_weights,
    write_json,
)


def test_overwrite_empties_only_this_tools_directory_of_the_same_kind(tmp_path):
    out = prepare_out_dir(tmp_path / "run", kind="sweep")
    (out / "results.jsonl").write_text("old")
    assert json.loads((out / MARKER).read_text())["kind"] == "sweep"
    with pytest.raises(UsageError, match="not empty"):
        prepare_out_dir(out, kind="sweep")
    with pytest.raises(UsageError, match="'sweep' output, not 'toy2d-gap'"):
        prepare_out_dir(out, overwrite=True, kind="toy2d-gap")
    assert (out / "results.jsonl").exists()
    prepare_out_dir(out, overwrite=True, kind="sweep")
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path):
    hf = tmp_path / "hf"
    (hf / "sub").mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin", "sub/x.json"):
        (hf / name).write_text("{}")
    with pytest.raises(UsageError, match="not written by dblend"):
        prepare_out_dir(hf, overwrite=True, kind="finetune-run")
    assert sorted(str(p.relative_to(hf)) for p in hf.rglob("*")) == [
        "config.json", "pytorch_model.bin", "sub", "sub/x.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_weights(tmp_path / "w.safetensors", {"t": torch.zeros(2)}, {})
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors", "w.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_exclusive_writes_never_replace_a_file_even_when_racing(tmp_path):
    target = tmp_path / "x.bin"

    def attempt(i):
        try:
            atomic_write(target, lambda p: p.write_bytes(bytes([i])), exclusive=True)
            return i
        except FileExistsError:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [i for i in pool.map(attempt, range(16)) if i is not None]
    assert len(winners) == 1 and target.read_bytes() == bytes(winners)
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]   # no temporary files left


def test_json_never_holds_nan_or_infinity(tmp_path):
    for bad in ({"a": float("nan")}, {"a": [1.0, float("inf")]}, {"a": {"b": -float("inf")}}):
        with pytest.raises(NonFiniteError, match="NaN or infinite"):
            dumps(bad)
        with pytest.raises(NonFiniteError):
            write_json(tmp_path / "x.json", bad)
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(NonFiniteError, match="weights"):
        save_weights(tmp_path / "w.safetensors", {"t": torch.tensor([float("nan")])}, {})
    assert not (tmp_path / "w.safetensors").exists()


def test_truncated_or_foreign_json_is_a_usage_error(tmp_path):
    (tmp_path / "t.json").write_text('{"a": ')
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_json(tmp_path / "t.json")
    with pytest.raises(UsageError, match="JSON object"):
        read_json(tmp_path / "l.json")
    with pytest.raises(UsageError, match="cannot be read"):
        read_json(tmp_path / "missing.json")
