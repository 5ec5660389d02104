"""``dblend report DIR``: a sweep's results as the paper's kind of table, Pareto fronts,
hypervolumes, ``r_w`` relative to MORL, DB-KLA against lambda, and image grids.

``r_w`` relative to MORL is the gain ratio ``(r_w(method) - r_w(pretrained)) / (r_w(MORL) -
r_w(pretrained))`` at the same ``w``, averaged over the interior grid points where MORL exists
(1 means MORL's gain; the raw ``r_w`` can be near 0 or negative, so its plain ratio is not).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.hypervolume import hypervolume
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.evaluation.sweep import SweepConfig, rewards_path, sample_path
from diffusion_blend.io import read_json, save_figure, write_json, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def load_sweep(out: str | Path) -> tuple[SweepConfig, list[dict]]:
    out = Path(out)
    if not (out / "sweep.json").exists() or not (out / "results.jsonl").exists():
        raise UsageError(f"{out} holds no sweep (no sweep.json / results.jsonl); run "
                         "`dblend sweep --out DIR` first")
    try:
        cfg = SweepConfig.from_dict(read_json(out / "sweep.json", "sweep config"))
    except (TypeError, KeyError) as e:
        raise UsageError(f"sweep config {out / 'sweep.json'} is not a sweep config ({e})") \
            from None
    rows = []
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return cfg, [r for r in rows if r.get("available")]


def select(rows: list[dict], tag: str, method: str | None = None) -> list[dict]:
    """Rows of one tag (and method), sorted by ``w[0]`` then ``lam``."""
    out = [r for r in rows if r["tag"] == tag and (method is None or r["method"] == method)]
    return sorted(out, key=lambda r: (-r["w"][0], r["lam"]))


def methods_of(rows: list[dict], tag: str = "main") -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["tag"] == tag and r["method"] not in seen:
            seen.append(r["method"])
    return seen


NO_REFERENCE = ("the sweep has no pretrained row: add 'pretrained' to --methods or give "
                "--reference-point")


def check_reference(methods: tuple[str, ...], ref: tuple[float, ...] | None) -> None:
    """Refuse, before any sampling, a sweep whose report would have no hypervolume reference."""
    if ref is None and "pretrained" not in methods:
        raise UsageError(NO_REFERENCE)


def reference_point(rows: list[dict]) -> list[float]:
    """The pretrained model's mean rewards (the default hypervolume reference)."""
    pre = select(rows, "main", "pretrained")
    if not pre:
        raise UsageError(NO_REFERENCE)
    return pre[0]["rewards"]


def gain_ratios(rows: list[dict], tag: str) -> dict[str, dict[str, float]]:
    """Per method, ``w[0] -> (r_w - r_w(pre)) / (r_w(MORL) - r_w(pre))`` at interior ``w``."""
    morl = {tuple(r["w"]): r["r_w"] for r in select(rows, "main", "morl")}
    pre = {tuple(r["w"]): r["r_w"] for r in select(rows, "main", "pretrained")}
    out: dict[str, dict[str, float]] = {}
    for r in select(rows, tag):
        w = tuple(r["w"])
        if w in morl and w in pre and 0 < max(w) < 1 and abs(morl[w] - pre[w]) > 1e-12:
            out.setdefault(r["method"], {})[f"{w[0]:g}"] = (r["r_w"] - pre[w]) / (morl[w] - pre[w])
    return out


def coincidences(paired: dict, method: str = "soup") -> list[str]:
    """The interior ``w`` at which ``method``'s ``r_w`` is within the paired 95% CI of DB-MPA's
    (same seeds): there the sweep cannot tell them apart."""
    return sorted((w for w, (mean, ci) in paired.get(method, {}).items()
                   if 0 < float(w) < 1 and abs(mean) <= ci), key=float)


def summarise(cfg: SweepConfig, rows: list[dict], ref: list[float] | None = None) -> dict:
    """The sweep's headline numbers (what ``--json`` prints)."""
    ref = list(ref) if ref is not None else reference_point(rows)
    hv = {m: hypervolume([r["rewards"] for r in select(rows, "main", m)], ref)
          for m in methods_of(rows)}
    matched = {m: hypervolume([r["rewards"] for r in select(rows, "matched", m)
                               + _vertices(rows, m)], ref) for m in methods_of(rows, "matched")}
    ratios = {t: {m: sum(v.values()) / len(v) for m, v in gain_ratios(rows, t).items()}
              for t in ("main", "matched")}
    out = {"domain": cfg.domain, "reference_point": ref, "hypervolume": hv,
           "hypervolume_matched_kl": matched, "r_w_ratio_to_morl": ratios["main"],
           "r_w_ratio_to_morl_matched_kl": ratios["matched"], "mean_cost": mean_costs(rows),
           "rows": len(rows)}
    if any("target" in r for r in rows):
        out["distance_to_target"] = target_distances(rows)
    if any("target_estimate" in r for r in rows):
        out["distance_to_smc_target"] = smc_target_distances(rows)
    return out


def per_seed_r_w(out: Path, row: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Row ``row``'s ``r_w`` on each seed and each seed's stratum (None for a sweep made before
    they were kept). For SMC, each seed's run estimate ``sum_k W_k r_w(x_k)``: the output is one
    particle drawn by the weights ``W``, so this has the same expectation and less variance
    (Rao-Blackwell)."""
    from safetensors.torch import load_file

    path = rewards_path(out, row["key"])
    if not path.is_file():
        return None
    saved = load_file(path)
    per_seed = saved.get("estimates", saved["rewards"])
    strata = saved.get("strata")
    return (per_seed @ torch.tensor(row["w"], dtype=torch.float64),
            None if strata is None else strata.long())


def paired_r_w_diff(out: Path, rows: list[dict], matched: bool = False,
                    against: str = "db-mpa") -> dict:
    """Each method's ``r_w`` minus ``against``'s (DB-MPA or MORL) on the same seeds, per w:
    ``{METHOD: {W1: [mean, ci95]}}``, the interval stratified by the seeds' classes or prompts
    where the domain fixes them by seed. ``matched``: the rows matched to MORL's path KL (DB-MPA,
    the soup, RGG); against DB-MPA, its matched row is the reference and MORL is compared too."""
    ref_tag = "matched" if matched and against == "db-mpa" else "main"
    res: dict[str, dict[str, list[float]]] = {}
    for ref in [r for r in select(rows, ref_tag, against) if r.get("available")]:
        base = per_seed_r_w(out, ref)
        for r in _paired_rows(rows, ref, matched) if base is not None else ():
            d = per_seed_r_w(out, r)
            if d is not None:
                (mean,), (se,) = mean_and_stderr((d[0] - base[0])[:, None], base[1])
                res.setdefault(r["method"], {})[f"{ref['w'][0]:g}"] = [mean, 1.96 * se]
    return res


def _paired_rows(rows: list[dict], ref: dict, matched: bool) -> list[dict]:
    def wanted(r: dict) -> bool:
        if matched:
            return r["tag"] == "matched" or (r["tag"] == "main" and r["method"] == "morl")
        return r["tag"] == "main"
    return [r for r in rows if r["w"] == ref["w"] and r.get("available")
            and r["method"] != ref["method"] and wanted(r)]


def _vertices(rows: list[dict], method: str) -> list[dict]:
    return [r for r in select(rows, "main", method) if max(r["w"]) == 1.0]


def mean_costs(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for m in methods_of(rows):
        costs = [r["cost"] for r in select(rows, "main", m)]
        out[m] = {k: sum(c[k] for c in costs) / len(costs) for k in costs[0]
                  if all(c[k] is not None for c in costs)}
    return out


def target_distances(rows: list[dict]) -> dict[str, dict[str, float]]:
    """toy2d: mean over the w grid of the error of the mean rewards against the exact target,
    and of the energy distance to exact target samples."""
    out = {}
    for m in methods_of(rows):
        rs = select(rows, "main", m)
        err = [sum((a - b) ** 2 for a, b in zip(r["rewards"], r["target"]["mean_rewards"],
                                                strict=True)) ** 0.5 for r in rs]
        out[m] = {"reward_error": sum(err) / len(err),
                  "energy_distance": sum(r["target"]["energy_distance"] for r in rs) / len(rs)}
    return out


def smc_target_distances(rows: list[dict]) -> dict[str, float]:
    """Any domain: mean over the w grid of the distance of each method's mean rewards to the
    exact target's, as SMC estimates them (its runs' weighted means) at the same w, lam = 1."""
    target = {tuple(r["w"]): r["target_estimate"] for r in select(rows, "main", "smc")
              if "target_estimate" in r}
    out = {}
    for m in methods_of(rows):
        err = [sum((a - b) ** 2 for a, b in zip(r["rewards"], target[tuple(r["w"])],
                                                strict=True)) ** 0.5
               for r in select(rows, "main", m) if tuple(r["w"]) in target]
        if err:
            out[m] = sum(err) / len(err)
    return out


# ---------------------------------------------------------------------------- writing


def write_report(out: str | Path, ref: list[float] | None = None) -> dict:
    """Figures, ``report.md`` and ``summary.json`` in the sweep directory ``out``."""
    out = Path(out)
    cfg, rows = load_sweep(out)
    summary = summarise(cfg, rows, ref)
    summary["paired_r_w_diff"] = paired_r_w_diff(out, rows)
    summary["paired_r_w_diff_matched_kl"] = paired_r_w_diff(out, rows, matched=True)
    summary["paired_r_w_diff_vs_morl"] = paired_r_w_diff(out, rows, against="morl")
    summary["paired_r_w_diff_vs_morl_matched_kl"] = paired_r_w_diff(out, rows, True, "morl")
    summary["soup_coincides_with_db_mpa_at_w"] = coincidences(summary["paired_r_w_diff"])
    names = _reward_names(cfg, rows)
    if len(summary["reference_point"]) == 2:
        save_figure(pareto_figure(rows, names, summary["reference_point"]), out / "pareto.png")
    save_figure(ratio_figure(rows), out / "rw_ratio.png")
    if select(rows, "kla"):
        save_figure(kla_figure(rows, names), out / "kla.png")
    grids = image_grids(out, rows)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", report_md(cfg, rows, summary, names, grids))
    return summary


def _reward_names(cfg: SweepConfig, rows: list[dict]) -> list[str]:
    k = len(rows[0]["rewards"]) if rows else 0
    if cfg.domain in ("digits", "fashion"):
        from diffusion_blend.domains import image_domain

        return list(cfg.pair or image_domain(cfg.domain).spec.pair)
    return [f"r{i + 1}" for i in range(k)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_figure(rows: list[dict], names: list[str], ref: list[float]) -> Figure:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for m in methods_of(rows):
        pts = select(rows, "main", m)
        ax.plot([r["rewards"][0] for r in pts], [r["rewards"][1] for r in pts],
                "o-" if len(pts) > 1 else "*", ms=4, label=m)
    for m in methods_of(rows, "matched"):
        pts = select(rows, "matched", m)
        ax.plot([r["rewards"][0] for r in pts], [r["rewards"][1] for r in pts], "x--", ms=5,
                label=f"{m} (KL matched to MORL)")
    ax.plot(*ref, "k+", ms=12, label="reference point")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize=7)
    ax.set_title("mean rewards over the w grid (lam = 1)", fontsize=9)
    return fig


def ratio_figure(rows: list[dict]) -> Figure:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for tag, style in (("main", "o-"), ("matched", "x--")):
        for m, vals in gain_ratios(rows, tag).items():
            ws = sorted(vals, key=float)
            ax.plot([float(w) for w in ws], [vals[w] for w in ws], style, ms=4,
                    label=m if tag == "main" else f"{m} (KL matched)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("w[0]")
    ax.set_ylabel("r_w gain / MORL's")
    if ax.get_legend_handles_labels()[0]:   # no MORL in the sweep: nothing to compare with
        ax.legend(fontsize=7)
    return fig


def kla_figure(rows: list[dict], names: list[str]) -> Figure:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m, style in (("db-kla", "o-"), ("morl", "s")):
        pts = sorted(select(rows, "kla", m), key=lambda r: r["lam"])
        if m == "morl":
            pts += [r for r in select(rows, "main", "morl") if r["w"][0] == 1.0]
        label = "DB-KLA" if m == "db-kla" else "lambda-specific fine-tune"
        axes[0].plot([r["lam"] for r in pts], [r["rewards"][0] for r in pts], style, label=label)
        axes[1].plot([r["lam"] for r in pts], [r.get("path_kl", float("nan")) for r in pts],
                     style, label=label)
    axes[0].set_ylabel(f"mean {names[0]}")
    axes[1].set_ylabel("path KL to the pretrained chain")
    for ax in axes:
        ax.set_xlabel("lambda")
        ax.legend(fontsize=7)
    return fig


def image_grids(out: Path, rows: list[dict]) -> bool:
    """One row of images per method across the w grid (the first seed); images only."""
    from safetensors.torch import load_file

    from diffusion_blend.evaluation.images_demo import image_grid

    ws = sorted({tuple(r["w"]) for r in select(rows, "main")}, key=lambda w: w[0])
    grid, labels = [], []
    for m in methods_of(rows):   # a method missing at some w (MORL) leaves blank cells
        paths = {tuple(r["w"]): sample_path(out, r["key"]) for r in select(rows, "main", m)}
        x = [load_file(str(paths[w]))["x0"][0] if w in paths and paths[w].exists() else None
             for w in ws]
        shown = [v for v in x if v is not None]
        if not shown:
            continue
        if shown[0].ndim != 3:
            return False
        grid.append(x)
        labels.append(m)
    cols = [f"w={w[0]:g}" for w in ws]
    if grid:
        save_figure(image_grid(grid, labels, cols, "same seed across w, per method"),
                    out / "grids.png")
    return bool(grid)


def _cell(r: dict, i: int) -> str:
    return f"{r['rewards'][i]:+.3f} ± {r['rewards_ci95'][i]:.3f}"


def paper_table(rows: list[dict], tag: str, names: list[str], ratios: dict) -> list[str]:
    """The paper's table at the interior w closest to uniform: rewards, r_w, gain vs MORL,
    costs (and, on toy2d, the distance to the exact target)."""
    w = _central_w(rows)
    matched = {r["method"] for r in rows if r["tag"] == "matched"}
    pts = [r for r in rows if tuple(r["w"]) == w and (r["tag"] == tag or (
        tag == "matched" and r["tag"] == "main" and r["method"] not in matched))]
    toy = any("target" in r for r in pts)
    head = ["method", "lam (gamma)", *names, "r_w", "gain / MORL", "path KL", "NFE",
            "s / sample", "peak MB", "params", *(["reward error", "energy dist."] if toy else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(pts, key=lambda r: r["method"]):
        c, ratio = r["cost"], ratios.get(r["method"], {}).get(f"{w[0]:g}")
        knob = f"{r['lam']:g}" + (f" ({r['gamma']:.3g})" if r.get("gamma") is not None else "")
        cells = [r["method"], knob, *(_cell(r, i) for i in range(len(names))),
                 f"{r['r_w']:+.3f}", "-" if ratio is None else f"{ratio:.2f}",
                 f"{r['path_kl']:.3f}" if "path_kl" in r else "-",
                 f"{c['nfe_per_sample']:g}", f"{c['seconds_per_sample']:.2e}",
                 "-" if c["peak_memory_mb"] is None else f"{c['peak_memory_mb']:.0f}",
                 f"{c['params']:,}"]
        if toy:
            err = sum((a - b) ** 2 for a, b in zip(r["rewards"], r["target"]["mean_rewards"],
                                                   strict=True)) ** 0.5
            cells += [f"{err:.3f}", f"{r['target']['energy_distance']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [f"At w = {list(w)}:", ""] + lines


def _central_w(rows: list[dict]) -> tuple:
    ws = {tuple(r["w"]) for r in rows if r["tag"] == "main"}
    return min(ws, key=lambda w: max(abs(v - 1 / len(w)) for v in w))


def report_md(cfg: SweepConfig, rows: list[dict], summary: dict, names: list[str],
              grids: bool) -> str:
    ratios = {t: gain_ratios(rows, t) for t in ("main", "matched")}
    hv = summary["hypervolume"]
    lines = [f"# diffusion-blend sweep: {cfg.domain}", "",
             f"{cfg.seeds} held-out seeds per row (the same for every method), w grid "
             f"`{cfg.w_grid}`, lambda grid {list(cfg.lam_grid)}; ± is a 95% confidence "
             "interval. Gain / MORL is `(r_w - r_w(pretrained)) / (r_w(MORL) - "
             "r_w(pretrained))` at the same w. Config: `sweep.json`; rows: `results.jsonl`.",
             "", "## At lam = 1", "", *paper_table(rows, "main", names, ratios["main"])]
    if select(rows, "matched"):
        lines += ["", "## At matched distance from the base", "",
                  "DB-MPA and the soup at the lam, RGG at the gamma, where their path KL to the "
                  "pretrained chain equals MORL's at the same w (the other methods as at "
                  "lam = 1; CoDe's chain has no path density).", "",
                  *paper_table(rows, "matched", names, ratios["matched"])]
    lines += ["", "## Hypervolume", "",
              f"Reference point: {[round(v, 4) for v in summary['reference_point']]} "
              "(the pretrained model's mean rewards unless given).", "",
              "| method | hypervolume (lam = 1) | mean gain / MORL | KL-matched HV | "
              "KL-matched gain |", "|---|---|---|---|---|"]
    for m in hv:
        mhv = summary["hypervolume_matched_kl"].get(m)
        mr = summary["r_w_ratio_to_morl_matched_kl"].get(m)
        r = summary["r_w_ratio_to_morl"].get(m)
        lines.append(f"| {m} | {hv[m]:.4f} | {'-' if r is None else f'{r:.3f}'} | "
                     f"{'-' if mhv is None else f'{mhv:.4f}'} | "
                     f"{'-' if mr is None else f'{mr:.3f}'} |")
    lines += ["", _soup_note(summary), "", *paired_table(summary, cfg.seeds)]
    if "distance_to_target" in summary:
        lines += ["## Distance to the exact target (toy2d, mean over the w grid)", "",
                  "| method | reward error | energy distance |", "|---|---|---|"]
        lines += [f"| {m} | {d['reward_error']:.4f} | {d['energy_distance']:.5f} |"
                  for m, d in summary["distance_to_target"].items()]
        lines.append("")
    if "distance_to_smc_target" in summary:
        lines += ["## Distance to the exact target as SMC estimates it (mean over the w grid)", "",
                  "The distance of each method's mean rewards to the SMC runs' weighted means "
                  "at the same w (the target `p_pre exp(r_w / alpha)`; SMC's own row: its "
                  "output particles against its estimate).", "", "| method | distance |",
                  "|---|---|"]
        lines += [f"| {m} | {d:.4f} |" for m, d in summary["distance_to_smc_target"].items()]
        lines.append("")
    lines += [f"![{f}]({f})" for f in ("pareto.png", "rw_ratio.png", "kla.png", "grids.png")
              if (f != "grids.png" or grids)]
    return "\n".join(lines) + "\n"


def _soup_note(summary: dict) -> str:
    same = summary["soup_coincides_with_db_mpa_at_w"]
    if not same:
        return ("The soup and DB-MPA differ beyond the paired CIs at every interior w "
                "measured.")
    return (f"**The soup and DB-MPA coincide within the paired CIs** at w[0] = "
            f"{', '.join(same)}: "
            "the experts' shifts are small enough to act linearly there, so this sweep "
            "cannot separate the two methods at those w.")


def paired_table(summary: dict, seeds: int | None = None) -> list[str]:
    """The paired differences of ``r_w`` against DB-MPA and MORL (same seeds), with what
    separates (and, given the sweep's ``seeds``, what more seeds would resolve)."""
    lines = []
    for key, title in (("paired_r_w_diff", "DB-MPA's on the same seeds, at lam = 1"),
                       ("paired_r_w_diff_matched_kl", "DB-MPA's on the same seeds, at matched "
                        "path KL"),
                       ("paired_r_w_diff_vs_morl", "MORL's on the same seeds, at lam = 1"),
                       ("paired_r_w_diff_vs_morl_matched_kl", "MORL's on the same seeds, at "
                        "MORL's path KL")):
        diffs = summary.get(key) or {}
        if not diffs:
            continue
        ws = sorted({w for d in diffs.values() for w in d}, key=float)
        head = "| method | " + " | ".join(f"w[0] = {w}" for w in ws) + " |"
        lines += [f"## r_w minus {title}", "",
                  "Mean paired difference ± its 95% CI (stratified by the class or prompt "
                  "where the seed fixes it); **bold**: the interval excludes 0 (the methods "
                  "separate there). SMC is paired through each seed's weighted run estimate "
                  "(its drawn output's expectation, less variance).", "", head,
                  "|---" * (len(ws) + 1) + "|"]
        for m, d in diffs.items():
            cells = [_paired_cell(d.get(w)) for w in ws]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", separation(diffs, "MORL" if "morl" in key else "DB-MPA", seeds), ""]
    return lines


def separation(diffs: dict, against: str, seeds: int | None = None) -> str:
    """In words: the methods whose paired interval excludes 0 at every interior w, and the
    interior w at which each other method coincides with ``against`` (within its CI); with
    ``seeds``, also how many seeds would resolve each coincidence (``seeds_to_resolve``)."""
    apart, close = [], []
    for m, d in diffs.items():
        if not any(0 < float(w) < 1 for w in d):
            continue
        same = coincidences(diffs, m)
        if same:
            at = [w if seeds is None else f"{w} ({_seeds_text(*d[w], seeds)})" for w in same]
            close.append(f"{m} at w[0] = {', '.join(at)}")
        else:
            apart.append(m)
    need = ("" if seeds is None or not close else
            f" (In brackets: the seeds at which the measured difference would exceed its "
            f"95% CI, `{seeds} (ci / |mean|)^2`, if difference and spread stay as measured.)")
    return (f"Separate from {against} at every interior w: {', '.join(apart) or 'none'}. "
            f"Coincide with it within the paired CI: {'; '.join(close) or 'nowhere'}.{need}")


def seeds_to_resolve(mean: float, ci: float, seeds: int) -> int | None:
    """The seeds at which a paired difference ``mean ± ci`` measured on ``seeds`` seeds would
    exceed its 95% CI (the interval shrinks as ``1 / sqrt(n)``): ``seeds (ci / |mean|)^2``;
    None when no difference was measured."""
    return None if mean == 0 else math.ceil(seeds * (ci / abs(mean)) ** 2)


def _seeds_text(mean: float, ci: float, seeds: int) -> str:
    need = seeds_to_resolve(mean, ci, seeds)
    return "no difference measured" if need is None else f"~{need:,} seeds"


def _paired_cell(v: list[float] | None) -> str:
    if v is None:
        return "-"
    text = f"{v[0]:+.3f} ± {v[1]:.3f}"
    return f"**{text}**" if abs(v[0]) > v[1] else text
