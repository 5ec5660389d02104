"""Bad input through the real CLI, in a fresh process: the documented exit code, one line on
stderr naming the value, no traceback, and nothing created or deleted where the command would
write. One row per hardening item (the issue's numbering), plus more of our own."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion_blend.domains.digits import SPEC
from diffusion_blend.io import sha256_file
from tests.cli_process import run_cli

pytestmark = pytest.mark.slow

dblend = run_cli


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (so any change shows)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def hf_model_dir(path: Path) -> Path:
    """A Hugging Face model folder: the kind of directory ``--overwrite`` once deleted."""
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "pytorch_model.bin").write_bytes(b"weights")
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


def marked(path: Path, kind: str) -> Path:
    path.mkdir(parents=True)
    (path / ".dblend-output.json").write_text(json.dumps({"kind": kind, "version": 1}))
    (path / "result.json").write_text("{}")
    return path


def toy_run(root: Path) -> Path:
    """A finished tiny toy2d fine-tuning run (2 iterations)."""
    out = root / "run"
    r = dblend("finetune", "toy2d", "--iterations", "2", "--batch-size", "8", "--sample-steps", "5",
               "--eval-trajectories", "8", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out


def digits_weights_copy(root: Path) -> Path:
    dst = root / "weights"
    shutil.copytree(SPEC.weights_dir, dst, ignore=shutil.ignore_patterns("experts"))
    return dst


def wrong_shape_base(root: Path) -> Path:
    """A digits base whose tensors have the wrong shapes, with a matching sha256."""
    w = digits_weights_copy(root)
    save_file({"conv_in.weight": torch.zeros(3, 3)}, w / "base.safetensors")
    meta = json.loads((w / "base.json").read_text())
    (w / "base.json").write_text(json.dumps(meta | {"sha256": sha256_file(w / "base.safetensors")}))
    return w


def truncated_base_json(root: Path) -> Path:
    w = digits_weights_copy(root)
    (w / "base.json").write_text((w / "base.json").read_text()[:40])
    return w


def legacy_lora(root: Path, state: dict | None, name: str = "pytorch_lora_weights.safetensors",
                raw: bytes | None = None) -> Path:
    d = root / "old"
    d.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (d / name).write_bytes(raw)
    else:
        save_file(state, d / name)
    return d


def good_legacy_lora(root: Path) -> Path:
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    return legacy_lora(root, {f"{key}.down.weight": torch.randn(4, 32),
                              f"{key}.up.weight": torch.randn(32, 4)})


def nan_expert(root: Path) -> Path:
    """A toy2d expert run whose weights are NaN but whose files hash correctly."""
    run = toy_run(root)
    path = run / "expert.safetensors"
    from safetensors.torch import load_file

    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}
    save_file(state, path)
    meta = json.loads((run / "expert.json").read_text())
    (run / "expert.json").write_text(json.dumps(meta | {"sha256": sha256_file(path)}))
    return run


def spec_file(root: Path, **change) -> Path:
    from diffusion_blend.domains.toy2d import PRESETS

    spec = json.loads(json.dumps(PRESETS["bimodal-linear"]))
    for key, value in change.items():
        parent, _, leaf = key.rpartition(".")
        node = spec
        for part in filter(None, parent.split(".")):
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


SAMPLE = ("sample", "toy2d", "--n", "20", "--steps", "5")
FT = ("finetune", "toy2d", "--iterations", "2", "--batch-size", "8", "--sample-steps", "5",
      "--eval-trajectories", "8")

# (id, setup(root) -> dict of names used in argv, argv template, exit code, text on stderr,
#  the path that must stay unchanged). Templates use {root} and the names the setup returns.
ROWS = [
    # 1. --overwrite removes only what this tool wrote
    ("1-finetune-overwrite-hf-folder", lambda r: {"d": hf_model_dir(r / "hf")},
     [*FT, "--out", "{d}", "--overwrite"], 2, "not written by dblend", "{d}"),
    ("1-sweep-overwrite-user-folder", lambda r: {"d": hf_model_dir(r / "hf")},
     ["sweep", "--seeds", "2", "--out", "{d}", "--overwrite"], 2, "not written by dblend", "{d}"),
    ("1-gap-overwrite-other-kind", lambda r: {"d": marked(r / "m", "sweep")},
     ["gap", "toy2d", "--n", "10", "--steps", "5", "--out", "{d}", "--overwrite"], 2, "'sweep'",
     "{d}"),
    ("1-convert-overwrite-user-folder",
     lambda r: {"old": good_legacy_lora(r), "d": hf_model_dir(r / "hf")},
     ["convert-lora", "{old}", "{d}", "--overwrite"], 2, "not written by dblend", "{d}"),
    ("1-train-base-overwrite-user-folder", lambda r: {"d": hf_model_dir(r / "hf")},
     ["train-base", "digits", "--out", "{d}", "--overwrite", "--iterations", "2"], 2,
     "not written by dblend", "{d}"),
    # 2. lam * sum(w) > 1 is extrapolation
    ("2-w-sum-above-one", None, [*SAMPLE, "--w", "5,5", "--out", "{root}/o"], 2,
     "lam * sum(w)", "{root}"),
    ("2-w-0.8-0.8", None, [*SAMPLE, "--w", "0.8,0.8"], 2, "lam * sum(w)", "{root}"),
    ("2-sample-digits-w", None, ["sample", "digits", "--w", "0.8,0.8", "--n", "2"], 2,
     "lam * sum(w)", "{root}"),
    # 3. non-finite values
    ("3-lr-inf", None, [*FT, "--lr", "inf", "--out", "{root}/o"], 2, "'inf'", "{root}"),
    ("3-eta-nan", None, [*SAMPLE, "--eta", "nan"], 2, "'nan'", "{root}"),
    ("3-alpha-inf", None, [*FT, "--alpha", "inf", "--out", "{root}/o"], 2, "inf", "{root}"),
    ("3-huge-spec", lambda r: {"s": spec_file(r, **{"rewards.0.a": [1e300, 0]})},
     [*SAMPLE, "--spec", "{s}", "--json"], 2, "overflow", "{root}"),
    ("3-nan-expert-refused", lambda r: {"e": nan_expert(r)},
     [*SAMPLE, "--experts", "{e}", "--w", "1"], 2, "NaN", "{e}"),
    # 6. output paths checked before any work
    ("6-sample-digits-missing-parent", None,
     ["sample", "digits", "--n", "2", "--out", "{root}/nope/d/x.png"], 2, "does not exist",
     "{root}"),
    ("6-sample-digits-out-under-file", lambda r: {"f": _file(r / "f")},
     ["sample", "digits", "--n", "2", "--out", "{f}/x.png"], 2, "not a directory", "{root}"),
    ("6-sample-digits-out-is-dir", lambda r: {"d": _mkdir(r / "d.png")},
     ["sample", "digits", "--n", "2", "--out", "{d}"], 2, "is a directory", "{root}"),
    ("6-gap-out-is-file", lambda r: {"f": _file(r / "f")},
     ["gap", "toy2d", "--n", "10", "--steps", "5", "--out", "{f}"], 2, "not a directory", "{root}"),
    ("6-finetune-unwritable", None, [*FT, "--out", "/sys/dblend-test"], 2, "cannot write",
     "{root}"),
    ("6-sweep-missing-parent", None, ["sweep", "--seeds", "2", "--out", "{root}/a/b"], 2,
     "does not exist", "{root}"),
    ("6-sample-sd-missing-parent", None,
     ["sample", "sd", "--model", "{root}", "--experts", "{root}", "--out", "{root}/x/y.png"],
     2, "does not exist", "{root}"),
    # 7. corrupt or mismatched weights
    ("7-convert-garbage-safetensors", lambda r: {"old": legacy_lora(r, None, raw=b"garbage")},
     ["convert-lora", "{old}", "{root}/new"], 2, "could not be read", "{root}"),
    ("7-convert-truncated-safetensors",
     lambda r: {"old": legacy_lora(r, None, raw=(good_legacy_lora(r / "g") /
                                                 "pytorch_lora_weights.safetensors")
                                   .read_bytes()[:200])},
     ["convert-lora", "{old}", "{root}/new"], 2, "could not be read", "{root}"),
    ("7-convert-pickle", lambda r: {"old": legacy_lora(r, None, "pytorch_lora_weights.bin",
                                                       raw=_pickle_bytes())},
     ["convert-lora", "{old}", "{root}/new"], 2, "not a readable state dict", "{root}"),
    ("7-digits-base-wrong-shapes", lambda r: {"w": wrong_shape_base(r)},
     ["distill", "digits", "--weights", "{w}", "--out", "{root}/o"], 2, "does not fit",
     "{root}"),
    ("7-digits-truncated-metadata", lambda r: {"w": truncated_base_json(r)},
     ["distill", "digits", "--weights", "{w}", "--out", "{root}/o"], 2, "not valid JSON",
     "{root}"),
    # 8. values
    ("8-sample-sd-steps-0", None, ["sample", "sd", "--model", "m", "--experts", "e",
                                   "--steps", "0"], 2, "'0'", "{root}"),
    ("8-sample-sd-n-0", None, ["sample", "sd", "--model", "m", "--experts", "e", "--n", "0"],
     2, "'0'", "{root}"),
    ("8-sweep-pair-of-one", None, ["sweep", "digits", "--pair", "ink", "--out",
                                   "{root}/o"], 2, "--pair ink", "{root}"),
    ("8-sweep-reference-point-length", None,
     ["sweep", "--reference-point", "1,2,3", "--seeds", "2", "--out", "{root}/o"], 2,
     "--reference-point 1,2,3", "{root}"),
    ("8-sweep-no-reference", None,
     ["sweep", "--methods", "db-mpa,morl", "--seeds", "2", "--out", "{root}/o"], 2,
     "no pretrained row", "{root}"),
    ("8-spec-beta-abc", lambda r: {"s": spec_file(r, **{"schedule.beta_start": "abc"})},
     [*SAMPLE, "--spec", "{s}"], 2, "'abc'", "{root}"),
    ("8-threads-negative", None, [*SAMPLE, "--threads", "-3"], 2, "'-3'", "{root}"),
    ("8-ui-port-out-of-range", None, ["ui", "--port", "70000"], 2, "'70000'", "{root}"),
    ("8-ui-port-in-use", lambda r: {"port": busy_port()},
     ["ui", "--port", "{port}"], 2, "--port", "{root}"),
    ("8-resume-state-without-keys", lambda r: {"d": _break_state(toy_run(r))},
     [*FT, "--out", "{d}", "--resume"], 2, "corrupt", "{d}"),
    ("8-resume-truncated-config", lambda r: {"d": _truncate(toy_run(r), "config.json")},
     [*FT, "--out", "{d}", "--resume"], 2, "not valid JSON", "{d}"),
    ("8-resume-truncated-sweep-json", lambda r: {"d": _truncated_sweep(r)},
     ["sweep", "--seeds", "2", "--out", "{d}"], 2, "not valid JSON", "{d}"),
    # 9. zero means zero
    ("9-distill-iterations-0", None, ["distill", "digits", "--iterations", "0", "--out",
                                      "{root}/o"], 2, "'0'", "{root}"),
    ("9-sweep-steps-0", None, ["sweep", "--steps", "0", "--out", "{root}/o"], 2, "'0'",
     "{root}"),
    ("9-train-base-iterations-0", None, ["train-base", "digits", "--iterations", "0", "--out",
                                         "{root}/o"], 2, "'0'", "{root}"),
    # 10. validate everything before creating anything
    ("10-finetune-sample-steps-0", None, [*FT[:-4], "--sample-steps", "0", "--out", "{root}/o"],
     2, "'0'", "{root}"),
    ("10-sweep-seed-negative", None, ["sweep", "--seed", "-5", "--out", "{root}/o"], 2, "'-5'",
     "{root}"),
    ("10-finetune-bad-w", None, [*FT, "--w", "1,2,3", "--out", "{root}/o"], 2, "3 weights",
     "{root}"),
    ("10-sample-bad-w-with-out", None, [*SAMPLE, "--w", "1,0,0", "--out", "{root}/o"], 2,
     "3 weights", "{root}"),
    # 11. resume with a changed learning rate is refused by name
    ("11-resume-changed-lr", lambda r: {"d": toy_run(r)},
     ["finetune", "toy2d", "--iterations", "2", "--batch-size", "8", "--sample-steps", "5",
      "--eval-trajectories", "8", "--lr", "0.5", "--out", "{d}", "--resume"], 2, "'lr'", "{d}"),
    # 12. seeds
    ("12-seed-2-64", None, [*SAMPLE, "--seed", str(2**64)], 2, str(2**64), "{root}"),
    ("12-seed-near-2-64", None, [*SAMPLE, "--seed", str(2**64 - 5)], 2, "seeds", "{root}"),
    # 13. memory
    ("13-huge-n", None, ["sample", "toy2d", "--n", "2000000000", "--out", "{root}/o"], 2, "GiB",
     "{root}"),
    # 16. convert-lora onto itself, empty
    ("16-convert-onto-itself", lambda r: {"old": good_legacy_lora(r)},
     ["convert-lora", "{old}", "{old}", "--overwrite"], 2, "its own source", "{old}"),
    ("16-convert-empty", lambda r: {"old": legacy_lora(r, {})},
     ["convert-lora", "{old}", "{root}/new"], 2, "holds no tensors", "{root}"),
    # more of our own
    ("unknown-method", None, [*SAMPLE, "--method", "magic"], 2, "'magic'", "{root}"),
    ("unknown-flag", None, [*SAMPLE, "--bogus"], 2, "--bogus", "{root}"),
    ("missing-spec-file", None, [*SAMPLE, "--spec", "{root}/none.json"], 2, "none.json",
     "{root}"),
    ("report-of-nothing", None, ["report", "{root}"], 2, "holds no sweep", "{root}"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _pickle_bytes() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    return pickle.dumps({"x": Evil()})


def _break_state(run: Path) -> Path:
    ck = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    (run / "checkpoints" / ck / "state.json").write_text("{}")
    return run


def _truncate(run: Path, name: str) -> Path:
    (run / name).write_text((run / name).read_text()[:30])
    return run


def _truncated_sweep(root: Path) -> Path:
    d = marked(root / "sw", "sweep")
    (d / "sweep.json").write_text('{"domain": "toy')
    return d


def _run_row(row, root: Path) -> dict:
    _, setup, argv, _, _, watched = row
    names: dict = {"root": root}
    keep = []
    for k, v in (setup(root) if setup else {}).items():
        if isinstance(v, socket.socket):
            keep.append(v)
            v = v.getsockname()[1]
        names[k] = v
    fill = {k: str(v) for k, v in names.items()}
    watched = Path(watched.format(**fill))
    before = snapshot(watched)
    r = dblend(*[a.format(**fill) for a in argv], cwd=root)
    for s in keep:
        s.close()
    return {"run": r, "before": before, "after": snapshot(watched)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every row, run in parallel (each is a fresh interpreter: mostly import time)."""
    from concurrent.futures import ThreadPoolExecutor

    roots = {row[0]: tmp_path_factory.mktemp(row[0][:40]) for row in ROWS}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {row[0]: pool.submit(_run_row, row, roots[row[0]]) for row in ROWS}
        return {k: f for k, f in futures.items()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_code_and_nothing_written(results, row):
    name, _, _, code, text, _ = row
    res = results[name].result()
    r = res["run"]
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], r.stderr
    assert r.stdout == ""
    assert res["after"] == res["before"]


def test_sample_digits_is_quiet_and_draws_every_image(tmp_path):
    from diffusion_blend.evaluation.images_demo import grid_rows

    r = dblend("sample", "digits", "--n", "12", "--out", str(tmp_path / "x.png"), "--json")
    assert r.returncode == 0 and r.stderr == ""          # no PEFT "peft_config" warning
    assert json.loads(r.stdout)["n"] == 12 and (tmp_path / "x.png").stat().st_size > 0
    x = torch.arange(12)
    rows = grid_rows(x)
    assert [v for row in rows for v in row if v is not None] == list(x)
    assert len(rows) == 2 and all(len(row) == 8 for row in rows)


def test_version_names_the_stack():
    r = dblend("--version")
    assert r.returncode == 0 and r.stdout.count("\n") == 1
    for pkg in ("dblend", "torch", "diffusers", "peft", "transformers"):
        assert pkg in r.stdout
