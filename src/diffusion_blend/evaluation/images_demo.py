"""``dblend demo [fashion|digits]``: DB-MPA and DB-KLA on an image domain's shipped experts,
next to the fine-tunes.

Everything renders the same seeds, so a row of a grid shows one item moving along the
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
from diffusion_blend.domains import image_domain
from diffusion_blend.domains.images import ImageSpec, normalised_rewards
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.io import prepare_out_dir, save_figure, write_json, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def score(values: torch.Tensor, names: Sequence[str], strata: torch.Tensor | None = None) -> dict:
    """Mean and 95% CI half-width of every normalised reward (``values``: ``[n, K]``; the
    interval stratified by ``strata``, the seeds' classes)."""
    means, errs = mean_and_stderr(values, strata)
    return {r: {"mean": m, "ci95": 1.96 * e} for r, m, e in zip(names, means, errs, strict=True)}


def save_sample_grid(x0: torch.Tensor, title: str, path: str | Path) -> None:
    """Images in rows of eight, as one figure (``dblend sample digits|fashion --out``)."""
    rows = grid_rows(x0)
    save_figure(image_grid(rows, [""] * len(rows), [""] * len(rows[0]), title), path)


def grid_rows(images: Sequence, cols: int = 8) -> list[list]:
    """Every image of ``images`` in rows of ``cols`` (the last row padded with blank cells)."""
    cols = min(cols, len(images))
    rows = [list(images[i:i + cols]) for i in range(0, len(images), cols)]
    rows[-1] += [None] * (cols - len(rows[-1]))
    return rows


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str],
               title: str, cell: float = 0.8) -> Figure:
    """A matplotlib figure: ``rows[i][j]`` is one image (1xHxW grey in [-1, 1] or 3xHxW RGB)
    or ``None`` (a blank cell); pixels drawn as blocks, ``cell`` inches each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc + 0.8, cell * nr + 0.6),
                             squeeze=False)
    for i in range(nr):
        for j in range(nc):
            ax = axes[i][j]
            img = rows[i][j]
            if img is None:
                ax.set_frame_on(False)
            elif img.shape[0] == 3:   # RGB in [0, 1] (decoded sd latents)
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            else:                   # grey in [-1, 1]
                ax.imshow(((img[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def _jobs(spec: ImageSpec, grid_w: list[float],
          lams: list[float]) -> list[tuple[str, str, Preference]]:
    """``(label, method, preference over the experts)`` of every row of the demo; the MORL and
    lambda-specific fine-tunes are sampled as the ``morl`` method of a pair domain."""
    experts = list(spec.finetuned)
    a, b = (experts.index(n) for n in spec.pair)

    def on_pair(w: float, lam: float = 1.0) -> Preference:
        v = [0.0] * len(experts)
        v[a], v[b] = w, round(1 - w, 10)
        return Preference(tuple(v), lam, True)

    eye = [tuple(float(i == j) for j in range(len(experts))) for i in range(len(experts))]
    jobs = [("pretrained", "pretrained", Preference(eye[0]))]
    jobs += [(f"expert:{n}", "db-mpa", Preference(e)) for n, e in zip(experts, eye, strict=True)]
    jobs += [(f"db-mpa:{w}", "db-mpa", on_pair(w)) for w in grid_w]
    jobs += [(f"morl:{w}", "morl", Preference((w, round(1 - w, 10)))) for w in spec.morl_grid]
    jobs += [(f"db-kla:{lam}", "db-kla", on_pair(1.0, lam)) for lam in lams]
    jobs += [(f"kla-finetune:{lam}", "morl", Preference((1.0, 0.0), lam, True))
             for lam in spec.kla]
    return jobs


def run_demo(domain: str = "fashion", out: str | Path = "dblend-demo", overwrite: bool = False,
             n_per_class: int = 10, progress: bool = True,
             weights_dir: Path | None = None) -> Path:
    """Grids over w (DB-MPA) and lambda (DB-KLA), a Pareto plot and ``report.md``."""
    kind = image_domain(domain)
    spec = kind.spec
    out = prepare_out_dir(out, overwrite, f"{domain}-demo")
    start = time.perf_counter()
    every = kind(list(spec.finetuned), weights_dir=weights_dir)
    pair = kind(spec.pair, weights_dir=weights_dir)
    seeds = list(range(len(spec.classes) * n_per_class))   # seed s draws class s % 10
    grid_w, lams = [round(0.1 * i, 1) for i in range(11)], [0.0, 0.5, 1.0, 1.5, 2.0]
    scorers = normalised_rewards(spec.rewards, every.stats, every.classifier)
    y = every.cond(seeds)["y"]
    rows, images, values = {}, {}, {}
    for label, method, pref in tqdm(_jobs(spec, grid_w, lams), disable=not progress,
                                    desc="demo"):
        res = run_method(method, pair if method == "morl" else every, pref, seeds)
        values[label] = torch.stack([r(res.x0, y=y) for r in scorers], 1)
        rows[label] = score(values[label], spec.rewards, y) | {"nfe_per_sample": res.nfe_per_sample}
        images[label] = res.x0
    _grids(spec, out, images, grid_w, lams)
    save_figure(pareto_figure(spec, rows), out / "pareto.png")
    cross = cross_rewards({k: values[k] for k in ("pretrained",
                                                  *(f"expert:{e}" for e in spec.finetuned))},
                          spec.rewards, y)
    seconds = time.perf_counter() - start
    write_json(out / "results.json", {"domain": domain, "rows": rows, "cross_rewards": cross,
                                      "seconds": seconds, "n_per_class": n_per_class,
                                      "steps": spec.steps})
    write_text(out / "report.md", demo_report(spec, rows, cross, seconds, n_per_class))
    return out


def _grids(spec: ImageSpec, out: Path, images: dict, grid_w: list[float],
           lams: list[float]) -> None:
    shown = range(len(spec.classes))
    labels, cell = list(spec.classes), 0.8 if spec.size <= 8 else 1.1
    a, b = spec.pair
    mpa = [[images[f"db-mpa:{w}"][c] for w in grid_w] for c in shown]
    save_figure(image_grid(mpa, labels, [f"w={w}" for w in grid_w],
                           f"DB-MPA: w on '{a}' (1 - w on '{b}'), same seed per row", cell),
                out / "grid_mpa.png")
    kla = [[images[f"db-kla:{lam}"][c] for lam in lams] for c in shown]
    save_figure(image_grid(kla, labels, [f"lam={lam}" for lam in lams],
                           f"DB-KLA on the '{a}' expert (lam > 1 extrapolates)", cell),
                out / "grid_kla.png")


def pareto_figure(spec: ImageSpec, rows: dict) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    a, b = spec.pair

    def pts(prefix: str) -> list:
        keys = [k for k in rows if k.startswith(prefix)]
        return [rows[k][a]["mean"] for k in keys], [rows[k][b]["mean"] for k in keys]

    ax.plot(*pts("db-mpa:"), "o-", ms=3, label="DB-MPA (w grid)")
    ax.plot(*pts("morl:"), "s", label="MORL (one fine-tune per w)")
    for k in (f"expert:{a}", f"expert:{b}", "pretrained"):
        ax.plot(rows[k][a]["mean"], rows[k][b]["mean"], "*", ms=10, label=k)
    ax.set_xlabel(f"{a} (normalised)")
    ax.set_ylabel(f"{b} (normalised)")
    ax.legend(fontsize=7)
    ax.set_title(f"{spec.name}: mean rewards", fontsize=9)
    return fig


def cross_rewards(values: dict[str, torch.Tensor], names: Sequence[str],
                  strata: torch.Tensor | None = None) -> dict:
    """Each expert's change of every reward from the pretrained model, paired on the same
    seeds and classes (mean and 95% CI, stratified by ``strata``), and the conflicts: changes
    below zero beyond the CI."""
    base = values["pretrained"]
    out: dict = {"delta": {}, "conflicts": []}
    for key, vals in values.items():
        if key == "pretrained":
            continue
        means, errs = mean_and_stderr(vals - base, strata)
        out["delta"][key] = {r: {"mean": m, "ci95": 1.96 * e}
                             for r, m, e in zip(names, means, errs, strict=True)}
        expert = key.split(":", 1)[1]
        out["conflicts"] += [{"expert": expert, "lowers": r, **out["delta"][key][r]}
                             for r, m, e in zip(names, means, errs, strict=True)
                             if r != expert and m + 1.96 * e < 0]
    return out


def _fmt(cell: dict) -> str:
    return f"{cell['mean']:+.2f} ± {cell['ci95']:.2f}"


def _table(first: str, rows: dict, names: Sequence[str], extra=None) -> list[str]:
    head = f"| {first} | " + " | ".join(names) + (" | NFE |" if extra else " |")
    sep = "|---|" + "---|" * (len(names) + bool(extra))
    return [head, sep] + [f"| {k} | " + " | ".join(_fmt(v[r]) for r in names)
                          + (f" | {v[extra]:g} |" if extra else " |") for k, v in rows.items()]


def demo_report(spec: ImageSpec, rows: dict, cross: dict, seconds: float,
                n_per_class: int) -> str:
    conflicts = [f"- expert `{c['expert']}` lowers `{c['lowers']}` by {-c['mean']:.3f} "
                 f"(95% CI ± {c['ci95']:.3f})" for c in cross["conflicts"]]
    return (
        f"# diffusion-blend {spec.name} demo\n\n"
        f"Shipped base and LoRA experts; DDPM with {spec.steps} steps; {n_per_class} seeds "
        "per class (the same seeds for every row). Rewards are normalised by the pretrained "
        "model (0 = its mean, 1 = its standard deviation); ± is a 95% confidence interval, "
        "stratified by class.\n\n"
        "![DB-MPA](grid_mpa.png)\n\n![DB-KLA](grid_kla.png)\n\n![Pareto](pareto.png)\n\n"
        + "\n".join(_table("model", rows, spec.rewards, "nfe_per_sample"))
        + "\n\n## Cross-rewards: each expert's change from the pretrained model\n\n"
        "Paired on the same seeds and classes, so the interval is that of the change itself; "
        "the classes are fixed by the seeds (balanced), so it counts the spread within each "
        "class only.\n\n"
        + "\n".join(_table("expert", cross["delta"], spec.rewards))
        + "\n\n## Conflicts (an expert lowers another reward, beyond the 95% CI)\n\n"
        + ("\n".join(conflicts) or "none") + f"\n\nWall time: {seconds:.1f} s.\n")
