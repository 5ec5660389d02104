"""``dblend demo`` and ``dblend sample digits``: DB-MPA and DB-KLA on the shipped digits experts.

Everything renders the same seeds, so a row of a grid shows one digit moving along the
trade-off. Rewards are reported normalised (0 = the pretrained mean, 1 = its standard
deviation) with 95% confidence intervals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from diffusion_blend.blend import Denoiser, Preference
from diffusion_blend.domains import digits
from diffusion_blend.domains.digits import (
    DEFAULT_STEPS,
    MORL_GRID,
    PAIR,
    load_experts,
    morl_name,
    normalised_rewards,
    sample_digits,
)
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.io import prepare_out_dir, save_figure, write_json, write_text
from diffusion_blend.rewards.digits import DIGIT_REWARDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXPERTS = ("ink", "symmetry", "crisp", "smooth")
MORL = {w: morl_name(w) for w in MORL_GRID}
KLA = {0.5: "kla_ink_lam0p5", 2.0: "kla_ink_lam2"}


class DigitsModels:
    """The shipped base, experts and rewards, loaded once."""

    def __init__(self, experts: list[str], weights_dir: Path | None = None):
        self.weights_dir = Path(weights_dir or digits.WEIGHTS_DIR)
        self.names = experts
        self.base, self.experts, self.metas = load_experts(experts, self.weights_dir)
        stats = json.loads((self.weights_dir / "experts" / "rewards.json").read_text())
        clf = digits.load_classifier("classifier", self.weights_dir)
        self.rewards = normalised_rewards(DIGIT_REWARDS, stats, clf)

    def expert(self, name: str) -> Denoiser:
        return self.experts[self.names.index(name)]

    def blend(self, names: list[str], pref: Preference) -> Denoiser:
        """DB-MPA / DB-KLA of the named adapters in one routed forward per step (the base
        weights once; see ``pipelines.BlendedModel``); the last step stays the pretrained one,
        as the experts were trained."""
        from diffusion_blend.domains.digits import FrozenLastStep
        from diffusion_blend.pipelines import BlendedModel

        return FrozenLastStep(BlendedModel(self.base.model, list(names), pref), self.base)

    def render(self, denoiser: Denoiser, classes: torch.Tensor,
               seeds: list[int]) -> tuple[torch.Tensor, float]:
        return sample_digits(denoiser, classes, seeds, DEFAULT_STEPS)

    def values(self, x0: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Every normalised reward of every image, ``[n, len(DIGIT_REWARDS)]``."""
        return torch.stack([r(x0, y=classes) for r in self.rewards], 1)

    def score(self, x0: torch.Tensor, classes: torch.Tensor) -> dict:
        """Mean and 95% CI half-width of every normalised reward."""
        means, errs = mean_and_stderr(self.values(x0, classes))
        return {r.name: {"mean": m, "ci95": 1.96 * e}
                for r, m, e in zip(self.rewards, means, errs, strict=True)}


def parse_class(c: int | str) -> int:
    try:
        return digits.check_class(int(c))
    except ValueError:
        raise UsageError(f"--class {c!r} is not allowed; digits classes are 0-9") from None


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


def run_demo(out: str | Path = "dblend-demo", overwrite: bool = False, n_per_class: int = 10,
             progress: bool = True, weights_dir: Path | None = None) -> Path:
    """Grids over w (DB-MPA) and lambda (DB-KLA), a Pareto plot and ``report.md``."""
    out = prepare_out_dir(out, overwrite, "digits-demo")
    start = time.perf_counter()
    names = [*EXPERTS, *MORL.values(), *KLA.values()]
    bench = DigitsModels(names, weights_dir)
    classes = torch.arange(10).repeat(n_per_class)
    seeds = list(range(len(classes)))
    grid_w = [round(0.1 * i, 1) for i in range(11)]
    rows: dict[str, dict] = {}
    jobs = [("pretrained", bench.base)] + [(f"expert:{n}", bench.expert(n)) for n in EXPERTS]
    jobs += [(f"db-mpa:{w}", bench.blend(list(PAIR), Preference((w, 1 - w)))) for w in grid_w]
    jobs += [(f"morl:{w}", bench.expert(m)) for w, m in MORL.items()]
    lams = [0.0, 0.5, 1.0, 1.5, 2.0]
    jobs += [(f"db-kla:{lam}", bench.blend([PAIR[0]], Preference((1.0,), lam, True)))
             for lam in lams]
    jobs += [(f"kla-finetune:{lam}", bench.expert(n)) for lam, n in KLA.items()]
    images = {}
    for label, den in tqdm(jobs, disable=not progress, desc="demo"):
        x0, nfe = bench.render(den, classes, seeds)
        rows[label] = bench.score(x0, classes) | {"nfe_per_sample": nfe}
        images[label] = x0
    _grids(out, images, grid_w, lams)
    save_figure(pareto_figure(rows), out / "pareto.png")
    cross = cross_rewards({k: bench.values(images[k], classes)
                           for k in ("pretrained", *(f"expert:{e}" for e in EXPERTS))})
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


def run_sample(cls: int, w: Sequence[float], lam: float, n: int, seed: int, experts: list[str],
               allow_extrapolation: bool = False, weights_dir: Path | None = None,
               bench: DigitsModels | None = None) -> tuple[dict, torch.Tensor]:
    """One-off sampling for ``dblend sample digits`` (and the UI, which passes its loaded
    ``bench``): the JSON summary and the images, in the order ``sample toy2d``'s run returns."""
    cls = parse_class(cls)
    pref = Preference.for_experts(w, len(experts), lam, allow_extrapolation)
    if n < 1:
        raise UsageError(f"--n {n} is not allowed; use >= 1")
    bench = bench or DigitsModels(list(experts), weights_dir)
    classes = torch.full((n,), cls, dtype=torch.long)
    start = time.perf_counter()
    x0, nfe = bench.render(bench.blend(list(experts), pref), classes, list(range(seed, seed + n)))
    summary = {"class": cls, "experts": list(experts), "w": list(pref.w), "lam": pref.lam,
               "n": n, "seed": seed, "nfe_per_sample": nfe,
               "mean_rewards": {k: v["mean"] for k, v in bench.score(x0, classes).items()},
               "seconds": time.perf_counter() - start}
    return summary, x0
