"""``dblend demo``: DB-MPA and DB-KLA on the shipped digits experts, next to the fine-tunes.

Everything renders the same seeds, so a row of a grid shows one digit moving along the
trade-off. Rewards are reported normalised (0 = the pretrained mean, 1 = its standard
deviation) with 95% confidence intervals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from diffusion_blend.blend import Preference
from diffusion_blend.domains.digits import (
    DEFAULT_STEPS,
    MORL_GRID,
    PAIR,
    DigitsDomain,
    morl_name,
    normalised_rewards,
)
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.io import prepare_out_dir, save_figure, write_json, write_text
from diffusion_blend.rewards.digits import DIGIT_REWARDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXPERTS = ("ink", "symmetry", "crisp", "smooth")
MORL = {w: morl_name(w) for w in MORL_GRID}
KLA = {0.5: "kla_ink_lam0p5", 2.0: "kla_ink_lam2"}


def score(values: torch.Tensor) -> dict:
    """Mean and 95% CI half-width of every normalised reward (``values``: ``[n, K]``)."""
    means, errs = mean_and_stderr(values)
    return {r: {"mean": m, "ci95": 1.96 * e}
            for r, m, e in zip(DIGIT_REWARDS, means, errs, strict=True)}


def save_sample_grid(x0: torch.Tensor, title: str, path: str | Path) -> None:
    """Digits in rows of eight, as one figure (``dblend sample digits --out``)."""
    rows = grid_rows(x0)
    save_figure(image_grid(rows, [""] * len(rows), [""] * len(rows[0]), title), path)


def grid_rows(images: Sequence, cols: int = 8) -> list[list]:
    """Every image of ``images`` in rows of ``cols`` (the last row padded with blank cells)."""
    cols = min(cols, len(images))
    rows = [list(images[i:i + cols]) for i in range(0, len(images), cols)]
    rows[-1] += [None] * (cols - len(rows[-1]))
    return rows


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str],
               title: str) -> Figure:
    """A matplotlib figure: ``rows[i][j]`` is one image (1xHxW digits or 3xHxW RGB) or
    ``None`` (a blank cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(0.8 * nc + 0.8, 0.8 * nr + 0.6), squeeze=False)
    for i in range(nr):
        for j in range(nc):
            ax = axes[i][j]
            img = rows[i][j]
            if img is None:
                ax.set_frame_on(False)
            elif img.shape[0] == 3:   # RGB in [0, 1] (decoded sd latents)
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            else:                   # digits in [-1, 1]
                ax.imshow(((img[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def _jobs(grid_w: list[float], lams: list[float]) -> list[tuple[str, str, Preference]]:
    """``(label, method, preference over EXPERTS)`` of every row of the demo; the MORL and
    lambda-specific fine-tunes are sampled as the ``morl`` method of a ``PAIR`` domain."""
    a, b = (EXPERTS.index(n) for n in PAIR)

    def on_pair(w: float, lam: float = 1.0) -> Preference:
        v = [0.0] * len(EXPERTS)
        v[a], v[b] = w, round(1 - w, 10)
        return Preference(tuple(v), lam, True)

    eye = [tuple(float(i == j) for j in range(len(EXPERTS))) for i in range(len(EXPERTS))]
    jobs = [("pretrained", "pretrained", Preference(eye[0]))]
    jobs += [(f"expert:{n}", "db-mpa", Preference(e)) for n, e in zip(EXPERTS, eye, strict=True)]
    jobs += [(f"db-mpa:{w}", "db-mpa", on_pair(w)) for w in grid_w]
    jobs += [(f"morl:{w}", "morl", Preference((w, round(1 - w, 10)))) for w in MORL]
    jobs += [(f"db-kla:{lam}", "db-kla", on_pair(1.0, lam)) for lam in lams]
    jobs += [(f"kla-finetune:{lam}", "morl", Preference((1.0, 0.0), lam, True)) for lam in KLA]
    return jobs


def run_demo(out: str | Path = "dblend-demo", overwrite: bool = False, n_per_class: int = 10,
             progress: bool = True, weights_dir: Path | None = None) -> Path:
    """Grids over w (DB-MPA) and lambda (DB-KLA), a Pareto plot and ``report.md``."""
    out = prepare_out_dir(out, overwrite, "digits-demo")
    start = time.perf_counter()
    every, pair = DigitsDomain(EXPERTS, weights_dir=weights_dir), DigitsDomain(
        PAIR, weights_dir=weights_dir)
    seeds = list(range(10 * n_per_class))   # seed s draws digit s % 10
    grid_w, lams = [round(0.1 * i, 1) for i in range(11)], [0.0, 0.5, 1.0, 1.5, 2.0]
    scorers = normalised_rewards(DIGIT_REWARDS, every.stats, every.classifier)
    y = every.cond(seeds)["y"]
    rows, images, values = {}, {}, {}
    for label, method, pref in tqdm(_jobs(grid_w, lams), disable=not progress, desc="demo"):
        res = run_method(method, pair if method == "morl" else every, pref, seeds)
        values[label] = torch.stack([r(res.x0, y=y) for r in scorers], 1)
        rows[label] = score(values[label]) | {"nfe_per_sample": res.nfe_per_sample}
        images[label] = res.x0
    _grids(out, images, grid_w, lams)
    save_figure(pareto_figure(rows), out / "pareto.png")
    cross = cross_rewards({k: values[k] for k in ("pretrained",
                                                  *(f"expert:{e}" for e in EXPERTS))})
    seconds = time.perf_counter() - start
    write_json(out / "results.json", {"rows": rows, "cross_rewards": cross, "seconds": seconds,
                                      "n_per_class": n_per_class, "steps": DEFAULT_STEPS})
    write_text(out / "report.md", demo_report(rows, cross, seconds, n_per_class))
    return out


def _grids(out: Path, images: dict, grid_w: list[float], lams: list[float]) -> None:
    digits_shown = list(range(10))
    mpa = [[images[f"db-mpa:{w}"][d] for w in grid_w] for d in digits_shown]
    save_figure(image_grid(mpa, [str(d) for d in digits_shown], [f"w={w}" for w in grid_w],
                           f"DB-MPA: w on '{PAIR[0]}' (1 - w on '{PAIR[1]}'), same seed per row"),
                out / "grid_mpa.png")
    kla = [[images[f"db-kla:{lam}"][d] for lam in lams] for d in digits_shown]
    save_figure(image_grid(kla, [str(d) for d in digits_shown], [f"lam={lam}" for lam in lams],
                           f"DB-KLA on the '{PAIR[0]}' expert (lam > 1 extrapolates)"),
                out / "grid_kla.png")


def pareto_figure(rows: dict) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    a, b = PAIR

    def pts(prefix: str) -> list:
        keys = [k for k in rows if k.startswith(prefix)]
        return [rows[k][a]["mean"] for k in keys], [rows[k][b]["mean"] for k in keys]

    ax.plot(*pts("db-mpa:"), "o-", ms=3, label="DB-MPA (w grid)")
    ax.plot(*pts("morl:"), "s", label="MORL (one fine-tune per w)")
    for k in (f"expert:{PAIR[0]}", f"expert:{PAIR[1]}", "pretrained"):
        ax.plot(rows[k][a]["mean"], rows[k][b]["mean"], "*", ms=10, label=k)
    ax.set_xlabel(f"{a} (normalised)")
    ax.set_ylabel(f"{b} (normalised)")
    ax.legend(fontsize=7)
    ax.set_title("digits: mean rewards", fontsize=9)
    return fig


def cross_rewards(values: dict[str, torch.Tensor]) -> dict:
    """Each expert's change of every reward from the pretrained model, paired on the same
    seeds and classes (mean and 95% CI), and the conflicts: changes below zero beyond the CI."""
    base = values["pretrained"]
    out: dict = {"delta": {}, "conflicts": []}
    for key, vals in values.items():
        if key == "pretrained":
            continue
        means, errs = mean_and_stderr(vals - base)
        out["delta"][key] = {r: {"mean": m, "ci95": 1.96 * e}
                             for r, m, e in zip(DIGIT_REWARDS, means, errs, strict=True)}
        expert = key.split(":", 1)[1]
        out["conflicts"] += [{"expert": expert, "lowers": r, **out["delta"][key][r]}
                             for r, m, e in zip(DIGIT_REWARDS, means, errs, strict=True)
                             if r != expert and m + 1.96 * e < 0]
    return out


def _fmt(cell: dict) -> str:
    return f"{cell['mean']:+.2f} ± {cell['ci95']:.2f}"


def _table(first: str, rows: dict, extra=None) -> list[str]:
    head = f"| {first} | " + " | ".join(DIGIT_REWARDS) + (" | NFE |" if extra else " |")
    sep = "|---|" + "---|" * (len(DIGIT_REWARDS) + bool(extra))
    return [head, sep] + [f"| {k} | " + " | ".join(_fmt(v[r]) for r in DIGIT_REWARDS)
                          + (f" | {v[extra]:g} |" if extra else " |") for k, v in rows.items()]


def demo_report(rows: dict, cross: dict, seconds: float, n_per_class: int) -> str:
    conflicts = [f"- expert `{c['expert']}` lowers `{c['lowers']}` by {-c['mean']:.3f} "
                 f"(95% CI ± {c['ci95']:.3f})" for c in cross["conflicts"]]
    return (
        "# diffusion-blend digits demo\n\n"
        f"Shipped base and LoRA experts; DDPM with {DEFAULT_STEPS} steps; {n_per_class} seeds "
        "per digit (the same seeds for every row). Rewards are normalised by the pretrained "
        "model (0 = its mean, 1 = its standard deviation); ± is a 95% confidence interval.\n\n"
        "![DB-MPA](grid_mpa.png)\n\n![DB-KLA](grid_kla.png)\n\n![Pareto](pareto.png)\n\n"
        + "\n".join(_table("model", rows, "nfe_per_sample"))
        + "\n\n## Cross-rewards: each expert's change from the pretrained model\n\n"
        "Paired on the same seeds and classes, so the interval is that of the change itself.\n\n"
        + "\n".join(_table("expert", cross["delta"]))
        + "\n\n## Conflicts (an expert lowers another reward, beyond the 95% CI)\n\n"
        + ("\n".join(conflicts) or "none") + f"\n\nWall time: {seconds:.1f} s.\n")
