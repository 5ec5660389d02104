"""``dblend sweep``: every method over a w grid (and a lambda grid for DB-KLA) on one domain,
with the same held-out seeds for all, one JSON row per (method, w, lambda) in
``results.jsonl``. Finished rows are skipped when the sweep is run again (resume).

Comparisons are made twice: at ``lam = 1`` and at matched distance from the base: for each
interior ``w`` with a MORL row, DB-MPA and the soup are also run at the ``lam`` whose path KL to
the pretrained chain equals MORL's (interpolated over the lambda grid in ``sqrt(KL)``, which
grows about linearly with ``lam``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_blend.blend import Preference
from diffusion_blend.distributed import Dist
from diffusion_blend.domains.base import Domain, ExactTarget
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import METHODS, MethodConfig, path_kl, run_method
from diffusion_blend.evaluation.metrics import energy_distance, mean_and_stderr
from diffusion_blend.io import (
    atomic_write,
    check_out_dir,
    dumps,
    prepare_out_dir,
    read_json,
    write_json,
)
from diffusion_blend.seeding import MAX_SEED, seed_range

DOMAINS = ("toy2d", "digits", "fashion", "sd")
IMAGES = ("digits", "fashion")
DEFAULT_METHODS = ("pretrained", "db-mpa", "db-mpa-ls", "db-kla", "soup", "code", "rgg", "morl")
MATCHED = ("db-mpa", "soup")        # matched by lam
KL_MATCHED = (*MATCHED, "rgg")       # rgg: matched by its guidance scale gamma
REFERENCE_SEED = 2_000_000_000    # toy2d: exact target samples, disjoint from the sweep's


@dataclass
class SweepConfig:
    """One sweep; saved as ``sweep.json`` beside the results (a resume must match it)."""

    domain: str = "toy2d"
    spec: str = "bimodal"                   # toy2d problem
    pair: tuple[str, ...] | None = None     # image rewards (default: the shipped pair)
    methods: tuple[str, ...] = DEFAULT_METHODS
    w_grid: str = "0:1:0.1"
    lam_grid: tuple[float, ...] = (0.5, 1.5, 2.0)
    gamma_grid: tuple[float, ...] = (0.01, 0.03, 0.1)   # RGG, for the KL-matched comparison
    seeds: int = 64
    seed: int = 100_000_000                 # held out: fine-tuning used other seeds
    steps: int | None = None
    match: bool = True
    train_morl: bool = False
    n_show: int = 8
    baselines: MethodConfig = field(default_factory=MethodConfig)
    sd: dict | None = None   # model, experts, rewards, prompts, guidance, reward_kwargs, morl

    def check(self) -> None:
        if self.domain not in DOMAINS:
            raise UsageError(f"domain {self.domain!r} is not known; use one of {DOMAINS}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UsageError(f"--methods {','.join(bad) or '(none)'} not known; use some of "
                             f"{','.join(METHODS)}")
        if self.seeds < 2:
            raise UsageError(f"--seeds {self.seeds} is not allowed; use >= 2 (for the CIs)")
        if not 0 <= self.seed <= MAX_SEED - self.seeds:
            raise UsageError(f"--seed {self.seed} is not allowed; use 0 ... 2**64 - --seeds")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps} is not allowed; use >= 1")
        self._check_pair()
        if any(not 0 <= lam <= 10 for lam in self.lam_grid):
            raise UsageError(f"--lam-grid {list(self.lam_grid)}: each lambda must be in [0, 10]")
        if not self.gamma_grid or any(not g > 0 for g in self.gamma_grid):
            raise UsageError(f"--gamma-grid {list(self.gamma_grid)}: each gamma must be > 0")
        parse_grid(self.w_grid)

    def _check_pair(self) -> None:
        if self.pair is None:
            return
        if self.domain not in IMAGES:
            raise UsageError(f"--pair is for the image domains, not {self.domain}")
        from diffusion_blend.domains import image_domain

        known = image_domain(self.domain).spec.finetuned
        if len(self.pair) != 2 or len(set(self.pair)) != 2 or any(
                r not in known for r in self.pair):
            raise UsageError(f"--pair {','.join(self.pair)}: give two different rewards with "
                             f"experts, e.g. ink,smooth (known: {','.join(known)})")

    def k(self) -> int:
        """How many rewards the sweep's preferences weigh."""
        if self.domain == "sd":
            return len((self.sd or {}).get("rewards", ()))
        if self.domain in IMAGES:
            return 2
        from diffusion_blend.domains.toy2d import load_problem

        return load_problem(self.spec).k

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        d = dict(d)
        d["baselines"] = MethodConfig(**d.get("baselines", {}))
        for k in ("methods", "lam_grid", "gamma_grid", "pair"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def parse_grid(text: str) -> list[float]:
    """``start:stop:step`` (inclusive) or a comma list of weights in [0, 1]."""
    try:
        if ":" in text:
            a, b, s = (float(v) for v in text.split(":"))
            if s <= 0 or b < a:
                raise ValueError
            vals = [round(a + i * s, 10) for i in range(int(round((b - a) / s)) + 1)]
        else:
            vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--w-grid {text!r} is not a grid; use start:stop:step (e.g. 0:1:0.1) "
                         "or a comma list") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise UsageError(f"--w-grid {text!r}: weights must lie in [0, 1]")
    return vals


def w_points(text: str, k: int) -> list[tuple[float, ...]]:
    """The preferences of the grid: ``(v, 1 - v)`` for two rewards, a simplex grid for more."""
    vals = parse_grid(text)
    if k == 2:
        return [(v, round(1 - v, 10)) for v in vals]
    from diffusion_blend.evaluation.toy2d import simplex_grid

    step = min(b - a for a, b in zip(vals, vals[1:], strict=False)) if len(vals) > 1 else 1.0
    return simplex_grid(k, max(1, int(round(1 / step))))


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RowSpec:
    method: str
    w: tuple[float, ...]
    lam: float
    tag: str  # "main" (lam = 1), "kla" (DB-KLA lambda grid), "grid", "matched"
    gamma: float | None = None   # RGG's guidance scale, when the row sets it

    @property
    def key(self) -> str:
        w = ",".join(f"{v:g}" for v in self.w)
        lam = "" if self.tag == "matched" else f"|lam={self.lam:g}"
        gamma = "" if self.gamma is None or self.tag == "matched" else f"|gamma={self.gamma:g}"
        return f"{self.tag}|{self.method}|w={w}{lam}{gamma}"


def make_domain(cfg: SweepConfig, out: Path) -> Domain:
    """The domain of ``cfg``; on an image domain, missing MORL adapters are trained into
    ``out/morl`` when ``cfg.train_morl``."""
    if cfg.domain == "toy2d":
        from diffusion_blend.domains.toy2d import Toy2dDomain

        return Toy2dDomain(cfg.spec, cfg.steps)
    if cfg.domain in IMAGES:
        from diffusion_blend.domains import image_domain

        trainer = morl_trainer(out / "morl") if cfg.train_morl else None
        return image_domain(cfg.domain)(cfg.pair, cfg.steps, morl_dir=out / "morl",
                                        morl_trainer=trainer)
    if not cfg.sd:
        raise UsageError("sweep sd needs --model, --experts, --rewards and --prompts")
    from diffusion_blend.domains.sd import SdDomain

    return SdDomain(**cfg.sd, steps=cfg.steps)


def morl_trainer(out: Path):
    """An image domain's MORL trainer: the adapter for ``r_w`` fine-tuned by the engine (the
    experts' recipe and alpha) into ``out``, which it returns."""
    def train(domain, name: str, pref: Preference) -> Path:
        import logging

        from diffusion_blend.finetune.config import preset
        from diffusion_blend.finetune.images import ExpertSpec, train_expert

        spec = ExpertSpec(name, domain.names, list(pref.w), domain.alpha, "pathwise")
        logging.getLogger(__name__).info("training the MORL adapter %s", name)
        recipe = preset(domain.spec.finetuned[domain.names[0]], alpha=domain.alpha,
                        sample_steps=domain.steps)      # trained on the chain it is swept on
        train_expert(domain.spec, domain.weights_dir, out, spec, recipe, domain.stats)
        return out

    return train


def measure_row(spec: RowSpec, domain: Domain, cfg: SweepConfig, seeds: list[int],
                out: Path) -> dict:
    """Run one row and summarise it (rewards with 95% CIs, r_w, path KL, costs)."""
    pref = Preference(spec.w, spec.lam, allow_extrapolation=True)
    row = {"key": spec.key, "method": spec.method, "w": list(spec.w), "lam": spec.lam,
           "tag": spec.tag, "gamma": rgg_gamma_of(spec, cfg)}
    mcfg = cfg.baselines if spec.gamma is None else replace(cfg.baselines, rgg_gamma=spec.gamma)
    res = run_method(spec.method, domain, pref, seeds, mcfg)
    if res is None:
        return row | {"available": False}
    with torch.no_grad():
        r = domain.rewards(res.x0, **domain.cond(seeds)).double()
    strata = domain.strata(seeds)
    r_w = r @ torch.tensor(spec.w, dtype=torch.float64)
    row |= {"available": True, **_stats("rewards", r, strata), **_stats("r_w", r_w, strata)}
    _save_rewards(out, spec, r, res.estimates, strata)
    if res.estimates is not None:    # SMC: its runs' weighted means estimate the exact target's
        row |= _stats("target_estimate", res.estimates.double(), strata)
    if res.chain is not None:
        row |= _stats("path_kl", path_kl(domain, res.chain, seeds).double(), strata)
    row["cost"] = {"nfe_per_sample": res.nfe_per_sample, "seconds": res.seconds,
                   "seconds_per_sample": res.seconds / len(seeds),
                   "reward_evals_per_sample": res.reward_evals_per_sample,
                   "peak_memory_mb": res.peak_memory_mb, "added_memory_mb": res.added_memory_mb,
                   "params": res.params}
    target = domain.target(pref)
    if target is not None:
        row["target"] = _target_row(target, res.x0, cfg)
    _save_samples(out, spec, domain.images(res.x0[:cfg.n_show]))
    return row


def rgg_gamma_of(spec: RowSpec, cfg: SweepConfig) -> float | None:
    """RGG's guidance scale in a row (None for the other methods)."""
    if spec.method != "rgg":
        return None
    return cfg.baselines.rgg_gamma if spec.gamma is None else spec.gamma


def _stats(name: str, v: torch.Tensor, strata: torch.Tensor | None = None) -> dict:
    means, errs = mean_and_stderr(v.reshape(len(v), -1), strata)
    ci = [1.96 * e for e in errs]
    if v.ndim == 1:
        return {name: means[0], f"{name}_ci95": ci[0]}
    return {name: means, f"{name}_ci95": ci}


def _target_row(target: ExactTarget, x0: torch.Tensor, cfg: SweepConfig) -> dict:
    """Distance to the exact target of ``(w, lam)``: its expected rewards, energy distance."""
    ref = target.sample(seed_range(REFERENCE_SEED + cfg.seed, min(4000, max(len(x0), 500))))
    return {"mean_rewards": target.mean_rewards, "log_z": target.log_z,
            "energy_distance": energy_distance(x0, ref)}


def sample_path(out: Path, key: str) -> Path:
    """Where the first ``n_show`` samples of row ``key`` are kept (for image grids)."""
    return out / "samples" / (key.replace("|", "_").replace("=", "").replace(",", "-")
                              + ".safetensors")


def rewards_path(out: Path, key: str) -> Path:
    """Where row ``key``'s per-seed rewards ``[seeds, K]`` are kept (for paired comparisons:
    every row runs the same seeds), with SMC's per-seed run estimates (``estimates``) and each
    seed's stratum (``strata``, where the domain has them)."""
    return out / "per_seed" / sample_path(out, key).name


def _save_rewards(out: Path, spec: RowSpec, r: torch.Tensor, estimates: torch.Tensor | None,
                  strata: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    tensors = {"rewards": r, "estimates": estimates, "strata": strata}
    tensors = {k: v.detach().double().contiguous() for k, v in tensors.items() if v is not None}
    (out / "per_seed").mkdir(exist_ok=True)
    atomic_write(rewards_path(out, spec.key), lambda p: save_file(tensors, str(p)))


def _save_samples(out: Path, spec: RowSpec, x0: torch.Tensor) -> None:
    from safetensors.torch import save_file

    (out / "samples").mkdir(exist_ok=True)
    atomic_write(sample_path(out, spec.key),
                 lambda p: save_file({"x0": x0.detach().float().contiguous()}, str(p)))


# ---------------------------------------------------------------------------- the sweep


class Results:
    """``results.jsonl``: one JSON row per line, appended and flushed as each row finishes;
    a torn last line (the run was killed mid-write) is dropped on reading. Under several
    processes each rank appends to its own ``results.rankR.jsonl``, and rank 0 folds those
    into ``results.jsonl`` after each phase (and at the start, after a killed run)."""

    def __init__(self, path: Path, dist: Dist | None = None):
        self.path, self.dist = path, dist or Dist()
        self.rows: dict[str, dict] = {}
        if self.dist.main:
            self.rows = _read_rows(path)
            self._fold(sorted(path.parent.glob("results.rank*.jsonl")), order=())
        self.dist.barrier()
        self.rows = _read_rows(path)

    @property
    def mine(self) -> Path:
        """Where this process appends its rows."""
        return self.path if self.dist.world == 1 else self.path.with_name(
            f"results.rank{self.dist.rank}.jsonl")

    def add(self, row: dict) -> None:
        with self.mine.open("a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row

    def merge(self, order: list[str]) -> None:
        """After a phase: every rank's rows in ``results.jsonl``, in ``order``, on every rank."""
        if self.dist.world == 1:
            return
        self.dist.barrier()
        if self.dist.main:
            self.rows = _read_rows(self.path)      # what is on file, before this phase
            self._fold([self.path.with_name(f"results.rank{r}.jsonl")
                        for r in range(self.dist.world)], order)
        self.dist.barrier()
        self.rows = _read_rows(self.path)

    def _fold(self, shards: list[Path], order: Sequence[str]) -> None:
        """Rank 0: the shards' rows appended to the file's (``order`` first), shards removed."""
        new = {k: v for s in shards for k, v in _read_rows(s).items() if k not in self.rows}
        keys = [k for k in order if k in new] + [k for k in new if k not in order]
        self.rows |= {k: new[k] for k in keys}
        atomic_write(self.path, lambda p: p.write_text(
            "".join(dumps(r) + "\n" for r in self.rows.values())))
        for s in shards:
            s.unlink(missing_ok=True)


def _read_rows(path: Path) -> dict[str, dict]:
    """The rows of a results file by key (none if it is absent; a torn line is skipped)."""
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["key"]] = row
    return rows


def check_sweep_out(cfg: SweepConfig, out: str | Path, overwrite: bool) -> bool:
    """Validate the output directory before anything is written; ``True`` when it holds a
    sweep with the same config to resume."""
    out = Path(out)
    saved = out / "sweep.json"
    if saved.exists() and not overwrite:
        old = read_json(saved, "sweep config")
        if old != cfg.to_dict():
            diff = sorted(k for k in old.keys() | cfg.to_dict().keys()
                          if old.get(k) != cfg.to_dict().get(k))
            raise UsageError(f"--out {out} holds a sweep with another config (differs in "
                             f"{', '.join(diff)}); use another --out or pass --overwrite")
        return True
    check_out_dir(out, overwrite, "sweep")
    return False


def open_sweep(cfg: SweepConfig, out: str | Path, overwrite: bool) -> Path:
    """The output directory: new, or a previous sweep with the same config (resume)."""
    out = Path(out)
    if check_sweep_out(cfg, out, overwrite):
        return out
    out = prepare_out_dir(out, overwrite, "sweep")
    write_json(out / "sweep.json", cfg.to_dict())
    return out


def run_sweep(cfg: SweepConfig, out: str | Path, overwrite: bool = False,
              progress: bool = True, domain: Domain | None = None) -> Path:
    """Run (or resume) the sweep; returns the output directory with ``results.jsonl``. Under
    ``accelerate launch`` the rows of each phase are shared among the processes (every row
    runs all seeds in one process, so the result is the one process's, row for row)."""
    cfg.check()
    dist = Dist()
    out = open_sweep(cfg, out, overwrite) if dist.main else Path(out)
    dist.barrier()
    domain = domain or make_domain(cfg, out)
    results = Results(out / "results.jsonl", dist)
    seeds = seed_range(cfg.seed, cfg.seeds)

    def run(specs: list[RowSpec]) -> None:
        todo = [s for s in specs if s.key not in results.rows]
        for spec in tqdm(dist.shard(todo), disable=not (progress and dist.main), desc="sweep"):
            results.add(measure_row(spec, domain, cfg, seeds, out))
        results.merge([s.key for s in todo])

    run(main_rows(cfg, len(domain.reward_names)))
    if cfg.match:
        run(grid_rows(cfg, results.rows))
        run(matched_rows(cfg, results.rows))
    return out


def main_rows(cfg: SweepConfig, k: int) -> list[RowSpec]:
    """Every method at ``lam = 1`` over the w grid; DB-KLA and the lambda-specific MORL over
    the lambda grid on the first reward."""
    rows = [RowSpec(m, w, 1.0, "main") for w in w_points(cfg.w_grid, k)
            for m in cfg.methods if m != "db-kla"]
    if "db-kla" in cfg.methods:
        e0 = tuple(1.0 if i == 0 else 0.0 for i in range(k))
        for lam in sorted({0.0, 1.0, *cfg.lam_grid}):
            rows.append(RowSpec("db-kla", e0, lam, "kla"))
            if "morl" in cfg.methods and lam not in (0.0, 1.0):
                rows.append(RowSpec("morl", e0, lam, "kla"))
    return rows


def _interior_with_morl(rows: dict) -> list[tuple[float, ...]]:
    return [tuple(r["w"]) for r in rows.values() if r["tag"] == "main" and r["method"] == "morl"
            and r.get("available") and "path_kl" in r and 0 < max(r["w"]) < 1]


def grid_rows(cfg: SweepConfig, rows: dict) -> list[RowSpec]:
    """DB-MPA and the soup over the lambda grid, RGG over the gamma grid, where MORL exists
    (to find the settings that match MORL's path KL)."""
    out = [RowSpec(m, w, lam, "grid") for w in _interior_with_morl(rows)
           for m in MATCHED if m in cfg.methods for lam in cfg.lam_grid if lam != 1.0]
    out += [RowSpec("rgg", w, 1.0, "grid", g) for w in _interior_with_morl(rows)
            if _rgg_ok(rows, w) for g in cfg.gamma_grid]
    return out


def _rgg_ok(rows: dict, w: tuple) -> bool:
    return bool(rows.get(RowSpec("rgg", w, 1.0, "main").key, {}).get("available"))


def matched_rows(cfg: SweepConfig, rows: dict) -> list[RowSpec]:
    """DB-MPA and the soup at the lambda whose path KL equals MORL's at the same w."""
    out = []
    for w in _interior_with_morl(rows):
        target = rows[RowSpec("morl", w, 1.0, "main").key]["path_kl"]
        for m in (m for m in MATCHED if m in cfg.methods):
            pts = [(lam, rows[RowSpec(m, w, lam, tag).key]["path_kl"])
                   for lam, tag in [(1.0, "main")] + [(v, "grid") for v in cfg.lam_grid
                                                       if v != 1.0]]
            out.append(RowSpec(m, w, matched_lam(pts, target, max(cfg.lam_grid) * 2), "matched"))
        if _rgg_ok(rows, w):
            pts = [(g, rows[RowSpec("rgg", w, 1.0, "grid", g).key]["path_kl"])
                   for g in cfg.gamma_grid]
            g = matched_lam(pts, target, max(cfg.gamma_grid) * 2)
            out.append(RowSpec("rgg", w, 1.0, "matched", g))
    return out


def matched_lam(points: list[tuple[float, float]], target_kl: float, lam_max: float) -> float:
    """The ``lam`` where ``sqrt(path KL)`` reaches ``sqrt(target_kl)``: linear interpolation
    between the bracketing grid points (extrapolation from the nearest two, in [0, lam_max])."""
    pts = sorted((lam, max(kl, 0.0) ** 0.5) for lam, kl in points)
    pts = [(0.0, 0.0)] + [p for p in pts if p[0] > 0]
    goal = max(target_kl, 0.0) ** 0.5
    i = next((j for j in range(1, len(pts)) if pts[j][1] >= goal), len(pts) - 1)
    (l0, s0), (l1, s1) = pts[i - 1], pts[i]
    lam = l1 if s1 == s0 else l0 + (goal - s0) * (l1 - l0) / (s1 - s0)
    return round(min(max(lam, 0.0), lam_max), 4)
