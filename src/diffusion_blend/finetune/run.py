"""The fine-tuning loop: iterations, metrics, atomic checkpoints, exact resume.

Every iteration's trajectories and shuffles are drawn from seeds that are a pure function of
``(seed, iteration)``, and a checkpoint holds the trainable weights and optimizer state, so a
resumed run reaches bit-identical weights to an uninterrupted one. A run directory holds
``config.json``, ``metrics.jsonl``, ``checkpoints/`` and, at the end, ``expert.safetensors`` with
``expert.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion_blend.distributed import Dist
from diffusion_blend.errors import DivergedError, UsageError
from diffusion_blend.finetune import dpok
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task, iteration_seeds, trajectories
from diffusion_blend.finetune.pathwise import pathwise_loss
from diffusion_blend.finetune.stopping import Plateau
from diffusion_blend.io import (
    atomic_write,
    check_out_dir,
    fsync_dir_files,
    prepare_out_dir,
    read_json,
    read_marker,
    save_weights,
    sha256_file,
    write_json,
    write_marker,
)
from diffusion_blend.lr import warmup_lr

log = logging.getLogger(__name__)
# what a resumed run may change; everything else would give other weights than an uninterrupted
# run. The iteration count may grow only under a constant learning rate (a cosine schedule is
# laid out over the total).
RESUME_MAY_DIFFER = {"checkpoint_every", "eval_trajectories"}
RUN_KIND = "finetune-run"
EXTRA = "extra.safetensors"
STOP_OFFSET = 1 << 38   # the stopping rule's evaluation trajectories: never training seeds


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are trained (``requires_grad``), by name, detached and contiguous."""
    return {n: p.detach().contiguous().clone() for n, p in module.named_parameters()
            if p.requires_grad}


def load_trainable(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise UsageError(f"weights do not fit the model: unknown parameter {missing[0]!r}")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise UsageError(f"weights do not fit the model: {n!r} has shape "
                                 f"{list(v.shape)}, the model {list(params[n].shape)}")
            params[n].copy_(v)


# ---------------------------------------------------------------------------- optimizer state


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state[int(i)][k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, iteration: int, modules: dict, optimizers: dict,
                    config: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-N`` in a temp dir, rename it, then point ``latest.json`` at it
    (``extra``: more tensors to keep, such as the stopping rule's state)."""
    ckdir = out / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    final = ckdir / f"step-{iteration:06d}"
    tmp = ckdir / f".step-{iteration:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files, opt_meta = {}, {}
    for name, m in modules.items():
        save_file(trainable_state(m), tmp / f"{name}.safetensors")
    for name, o in optimizers.items():
        tensors, opt_meta[name] = _optimizer_tensors(o)
        save_file(tensors, tmp / f"{name}.safetensors")
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, tmp / EXTRA)
    files = {p.name: sha256_file(p) for p in tmp.iterdir()}
    write_json(tmp / "state.json", {"iteration": iteration, "config": config, "files": files,
                                    "optimizers": opt_meta})
    fsync_dir_files(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(ckdir / "latest.json", {"checkpoint": final.name, "iteration": iteration})
    for old in ckdir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(out: Path) -> tuple[Path, dict]:
    """The latest checkpoint's folder and its ``state.json`` (refused if missing)."""
    latest = out / "checkpoints" / "latest.json"
    if not latest.is_file():
        raise UsageError(f"--resume: {out} has no checkpoint (no checkpoints/latest.json)")
    try:
        ck = out / "checkpoints" / read_json(latest, "checkpoint pointer")["checkpoint"]
        return ck, read_json(ck / "state.json", "checkpoint state")
    except (KeyError, TypeError, UsageError) as e:
        raise UsageError(f"checkpoint in {out / 'checkpoints'} is corrupt ({e}); "
                         "not loaded") from None


def check_resume(out: Path, config: dict) -> None:
    """``--resume`` with a config the checkpoint was not saved with is refused before anything
    loads: the resumed run would not end where an uninterrupted one does."""
    _, state = latest_state(out)
    refuse_changed(state.get("config") if isinstance(state, dict) else None, config)


def load_checkpoint(out: Path, modules: dict, optimizers: dict) -> dict:
    """Verify every file's sha256, then load; a corrupt checkpoint is refused, not loaded."""
    ck, state = latest_state(out)
    try:
        files, iteration = dict(state["files"]), int(state["iteration"])
        opt_meta = {name: state["optimizers"][name] for name in optimizers}
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint in {out / 'checkpoints'} is corrupt ({e}); "
                         "not loaded") from None
    for fname, digest in files.items():
        if not (ck / fname).is_file() or sha256_file(ck / fname) != digest:
            raise UsageError(f"checkpoint file {ck / fname} is corrupt (sha256 mismatch or "
                             "missing); not loaded")
    try:
        for name, m in modules.items():
            load_trainable(m, load_file(ck / f"{name}.safetensors"))
        for name, o in optimizers.items():
            _load_optimizer(o, load_file(ck / f"{name}.safetensors"), opt_meta[name])
        state["extra"] = load_file(ck / EXTRA) if EXTRA in files else {}
    except (SafetensorError, KeyError, ValueError) as e:
        raise UsageError(f"checkpoint {ck} could not be loaded ({e})") from None
    return state | {"iteration": iteration}


def config_differences(saved: dict, new: dict) -> list[str]:
    """The fields whose change would make a resumed run differ from an uninterrupted one."""
    may_differ = RESUME_MAY_DIFFER | ({"iterations"} if new.get("lr_schedule") == "constant"
                                      and saved.get("lr_schedule") == "constant" else set())
    keys = (saved.keys() | new.keys()) - may_differ
    return sorted(k for k in keys if saved.get(k) != new.get(k))


def refuse_changed(saved: object, new: dict) -> None:
    """A resume whose config differs from the saved one (where it matters) is refused."""
    diff = config_differences(saved if isinstance(saved, dict) else {}, new)
    if diff:
        raise UsageError(f"--resume: the checkpoint's config differs in {diff}; "
                         "resume with the same settings or start a new --out")


def run_identity(cfg: FinetuneConfig, meta: dict) -> dict:
    """A fine-tuning run's identity: its config and the task it trains (``config.json``)."""
    return cfg.to_dict() | {"task": meta}


# ---------------------------------------------------------------------------- the run


def check_run_dir(out: Path, run_config: dict, resume: bool, overwrite: bool) -> None:
    """Validate a run directory before anything is created: on resume, the same config; else
    an empty or new directory, or (``overwrite``) one of this tool's run directories."""
    if not resume:
        check_out_dir(out, overwrite, RUN_KIND)
        return
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--resume: {out} holds no run (no config.json)")
    refuse_changed(read_json(cfg_path, "run config"), run_config)


def prepare_run_dir(out: Path, run_config: dict, resume: bool, overwrite: bool) -> None:
    """Refuse another run's directory unless ``overwrite``; on resume, refuse another config."""
    check_run_dir(out, run_config, resume, overwrite)
    if not resume:
        prepare_out_dir(out, overwrite, RUN_KIND)
    elif read_marker(out) is None:   # a run written before markers existed
        write_marker(out, RUN_KIND)


def lr_at(cfg: FinetuneConfig, it: int, rule: Plateau | None = None) -> float:
    """Learning rate of iteration ``it``: linear warm-up, then constant or cosine (or, under the
    plateau rule, constant until the plateau and a cosine decay after it)."""
    lr = warmup_lr(cfg.lr, it, cfg.warmup, cfg.iterations, cfg.lr_schedule == "cosine")
    return lr * (rule.lr_factor(it) if rule is not None else 1.0)


def train(task: Task, cfg: FinetuneConfig, out: str | Path, meta: dict, resume: bool = False,
          overwrite: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Fine-tune ``task.policy`` in place; returns the last iteration's metrics.

    ``meta`` describes the task (spec, reward weights, base hash) and is part of the run's
    identity. ``stop_after`` ends the loop early (as if killed) after that many iterations.
    """
    cfg.check()
    out, dist = Path(out), Dist()
    run_config = run_identity(cfg, meta)
    if dist.main:
        prepare_run_dir(out, run_config, resume, overwrite)
    _place(task, dist)
    params = [p for p in task.policy.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the policy has no trainable parameters")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    modules, optimizers = {"policy": task.policy}, {"optimizer": opt}
    value, value_opt = _value_model(task, cfg, modules, optimizers)
    rule = (Plateau(cfg.patience, decay=cfg.decay, min_decay=cfg.eval_every,
                    min_progress=cfg.min_progress) if cfg.stop == "plateau" else None)
    start = _restore(out, modules, optimizers, rule) if resume else 0
    if dist.main and not resume:
        write_json(out / "config.json", run_config)
    if dist.main:
        _truncate_metrics(out / "metrics.jsonl", start)
    last: dict = {"iteration": start, "converged": True} if rule and rule.finished(start) else {}
    todo = range(start, start if last else cfg.iterations)
    bar = tqdm(todo, initial=start, total=cfg.iterations, disable=not (progress and dist.main),
               desc=f"finetune ({cfg.estimator})")
    for it in bar:
        t0 = time.perf_counter()
        lr = lr_at(cfg, it, rule)
        for g in opt.param_groups:
            g["lr"] = lr
        stats = _iteration(task, cfg, it, opt, params, value, value_opt, dist)
        stats = {k: dist.mean(v) for k, v in stats.items()}
        check_finite_run(it + 1, stats, params)
        last = {"iteration": it + 1, **stats, "lr": lr, "seconds": time.perf_counter() - t0}
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['path_kl']:.3f}")
        done = it + 1
        evaluated = rule is not None and not rule.decaying and done % cfg.eval_every == 0
        if evaluated:
            last |= check_plateau(task, cfg, rule, done)
        if rule is not None:
            last["converged"] = rule.finished(done)
        if dist.main:
            _append_jsonl(out / "metrics.jsonl", last)
            if (evaluated or last.get("converged") or done % cfg.checkpoint_every == 0
                    or done == cfg.iterations):
                save_checkpoint(out, done, modules, optimizers, run_config,
                                rule.state_dict() if rule else None)
        if last.get("converged") or (stop_after is not None and done - start >= stop_after):
            break
    return last


def _value_model(task: Task, cfg: FinetuneConfig, modules: dict, optimizers: dict) -> tuple:
    """DPOK's value network and its optimizer (registered for checkpoints), or ``(None, None)``."""
    if not (cfg.estimator == "dpok" and cfg.advantage == "value"):
        return None, None
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        value = dpok.ValueNet(math.prod(task.shape), task.schedule.T, cfg.hidden)
    value.to(task.device)
    value_opt = torch.optim.Adam(value.parameters(), lr=cfg.value_lr)
    modules["value"], optimizers["value_optimizer"] = value, value_opt
    return value, value_opt


def _restore(out: Path, modules: dict, optimizers: dict, rule: Plateau | None) -> int:
    """Load the last checkpoint (and the stopping rule's state); its iteration."""
    ck = load_checkpoint(out, modules, optimizers)
    if rule is not None and ck["extra"]:
        rule.load_state_dict(ck["extra"])
    return ck["iteration"]


def check_plateau(task: Task, cfg: FinetuneConfig, rule: Plateau, done: int) -> dict:
    """Evaluate the objective on the fixed stopping batch and update the rule."""
    seeds = iteration_seeds(cfg.seed, 0, cfg.stop_trajectories, STOP_OFFSET)
    r, kl, _ = trajectories(task, seeds, cfg.sample_steps)
    values = r - cfg.alpha * kl
    plateau = rule.update(values, done)
    return {"stop_objective": float(values.mean()), "plateau": plateau}


def check_finite_run(iteration: int, stats: dict, params: list[torch.Tensor]) -> None:
    """Stop a run whose loss, metrics or weights became NaN or infinite (say, ``lr`` too big)."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    weights_ok = bool(torch.stack([p.detach().isfinite().all() for p in params]).all())
    if bad or not weights_ok:   # one device sync per iteration, not one per tensor
        what = f"metric {bad[0]!r}" if bad else "the weights"
        raise DivergedError(f"iteration {iteration}: {what} became NaN or infinite; the run "
                            "stopped (lower --lr, or check the reward); the last checkpoint "
                            "is kept")


def _place(task: Task, dist: Dist) -> None:
    """Under a launcher, each process runs on its own device and averages its gradients."""
    if dist.world > 1:
        task.device = dist.device()
        task.policy.to(task.device)
        task.sync_grads = dist.sync_grads


def _iteration(task, cfg, it, opt, params, value, value_opt, dist: Dist) -> dict:
    seeds = dist.shard(iteration_seeds(cfg.seed, it, cfg.batch_size))
    step = GuardedStep(opt, params, cfg, task)
    if cfg.estimator == "pathwise":
        return _pathwise_iteration(task, cfg, seeds, step)
    gen = torch.Generator().manual_seed((cfg.seed << 32) + it)
    with autocast(task, cfg):
        ro = dpok.rollout(task, cfg, seeds)
    A = dpok.advantages(ro, dpok.returns(ro, cfg), cfg, value, value_opt, gen, task.sync_grads)
    with autocast(task, cfg):
        update = dpok.dpok_update(task, cfg, ro, A, opt, gen, step)
    return dpok.dpok_stats(ro, cfg) | update | {"skipped_steps": step.skipped}


def _pathwise_iteration(task, cfg, seeds: list[int], step) -> dict:
    """One optimizer step over ``grad_accumulation`` micro-batches (gradients summed with
    weights ``len(micro) / len(batch)``, so the step equals the whole batch's)."""
    step.opt.zero_grad()
    n, parts = len(seeds), max(1, min(cfg.grad_accumulation, len(seeds)))
    totals: dict[str, float] = {}
    for i in range(parts):
        micro = seeds[i * n // parts:(i + 1) * n // parts]
        with autocast(task, cfg):
            loss, stats = pathwise_loss(task, cfg, micro)
        (loss * (len(micro) / n)).backward()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * len(micro) / n
    step()
    return totals | {"skipped_steps": step.skipped}


def autocast(task: Task, cfg: FinetuneConfig) -> torch.autocast:
    """Mixed-precision autocast on the task's device (a no-op for ``mixed_precision="no"``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    return torch.autocast(torch.device(task.device).type, dtype=dtype,
                          enabled=dtype is not None)


class GuardedStep:
    """Average gradients across processes, clip, step; a non-finite gradient (fp16 overflow,
    a bad batch) skips the step instead of writing NaNs into the weights."""

    def __init__(self, opt, params, cfg, task):
        self.opt, self.params, self.cfg, self.task, self.skipped = opt, params, cfg, task, 0

    def __call__(self) -> None:
        self.task.sync_grads(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if not torch.isfinite(norm):
            self.skipped += 1
            log.warning("non-finite gradient norm %s: optimizer step skipped", float(norm))
            self.opt.zero_grad()
            return
        self.opt.step()


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, upto: int) -> None:
    """Keep only the metrics of iterations already in the checkpoint (a killed run may have
    logged a few more, the last one perhaps torn)."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["iteration"] <= upto:
                kept.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda p: p.write_text("".join(r + "\n" for r in kept)))


def save_expert(out: Path, policy: torch.nn.Module, meta: dict) -> dict:
    """The trained weights as ``expert.safetensors`` and their description as ``expert.json``."""
    return save_weights(out / "expert.safetensors", trainable_state(policy), meta)
