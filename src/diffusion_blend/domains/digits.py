"""The digits domain: a small class-conditional diffusion model on scikit-learn's 8x8 digits.

The "prompt" is the digit class 0-9; class 10 is the null class used for classifier-free
guidance. Images are 1x8x8 in [-1, 1]. Everything here trains on 2 CPU cores in minutes, and
the shipped weights under ``diffusion_blend/weights/digits`` are what the recipes produce.
The domain also owns its experts by name (LoRA adapters on the one base, each refused if it was
trained on another base), their normalised rewards and its 10-step chain, whose last step
stays the pretrained map (``FrozenLastStep``), as the experts were trained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_blend.adapters import (
    AdapterView,
    adapter_names,
    add_lora,
    load_adapter_state,
    merged_copy,
)
from diffusion_blend.amortised import AmortisedDenoiser, PrefEmbedding
from diffusion_blend.blend import BlendedDenoiser, Denoiser, Guided, Preference, nfe_of
from diffusion_blend.errors import UsageError
from diffusion_blend.io import load_weights as load_weight_file
from diffusion_blend.io import read_json
from diffusion_blend.lr import warmup_lr
from diffusion_blend.rewards import get_reward
from diffusion_blend.sampling import Schedule, sample

log = logging.getLogger(__name__)
NULL_CLASS = 10
SHAPE = (1, 8, 8)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "digits"
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
    num_class_embeds=11, norm_num_groups=8, attention_head_dim=16,
)


# ---------------------------------------------------------------------------- data


def load_data(split_seed: int = 0, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits in [-1, 1], split into train / test by a seeded shuffle."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def check_class(c: int | str) -> int:
    """A digit class 0-9 (``"3"`` as typed is accepted); anything else is a ``UsageError``."""
    try:
        v = int(c) if isinstance(c, str) else c
    except ValueError:
        v = None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 9:
        raise UsageError(f"--class {c!r} is not allowed; digits classes are 0-9")
    return v


# ---------------------------------------------------------------------------- the denoiser


def build_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


class UNetDenoiser(nn.Module):
    """``eps(x, t, y)`` from a class-conditional ``UNet2DModel``; ``y=None`` is the null class."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        b = x.shape[0]
        if y is None:
            y = NULL_CLASS
        y = torch.as_tensor(y, device=x.device).long().reshape(-1).expand(b)
        t = t.reshape(-1).expand(b)
        return self.unet(x, t, class_labels=y).sample


# ---------------------------------------------------------------------------- recipes


@dataclass
class BaseConfig:
    """Recipe of the base model (``dblend train-base digits``)."""

    iterations: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    p_uncond: float = 0.1
    ema: float = 0.999
    seed: int = 0
    split_seed: int = 0
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def schedule(self) -> Schedule:
        return Schedule.linear(self.T, self.beta_start, self.beta_end)


def train_base(cfg: BaseConfig, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the class-conditional UNet with the DDPM loss; returns the EMA model and stats."""
    data = load_data(cfg.split_seed)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = cfg.schedule().abar.float()
    x_all, y_all = data["train_x"], data["train_y"]
    start, losses = time.perf_counter(), []
    for it in tqdm(range(cfg.iterations), disable=not progress, desc="train-base"):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond] = NULL_CLASS
        t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (unet(xt, t, class_labels=y).sample - eps).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = warmup_lr(cfg.lr, it, cfg.warmup, cfg.iterations)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - cfg.ema)
        losses.append(float(loss.detach()))
    stats = {"train_seconds": time.perf_counter() - start,
             "final_loss": sum(losses[-100:]) / len(losses[-100:])}
    return ema.eval(), stats


# ---------------------------------------------------------------------------- classifiers


class Classifier(nn.Module):
    """A small CNN on 1x8x8 digits; ``features`` is its penultimate layer (for FID-like scores)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Flatten(), nn.Linear(8 * width, 128), nn.SiLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class ClassifierConfig:
    width: int = 32
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    noise: float = 0.1  # input noise augmentation: robust on generated images
    seed: int = 0
    split_seed: int = 0


def train_classifier(cfg: ClassifierConfig, progress: bool = False) -> tuple[Classifier, dict]:
    """Train on the train split; report accuracy on the test split."""
    data = load_data(cfg.split_seed)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x, y = data["train_x"], data["train_y"]
    for _ in tqdm(range(cfg.epochs), disable=not progress, desc="classifier"):
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            xb = x[idx] + cfg.noise * torch.randn(x[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((model(data["test_x"]).argmax(1) == data["test_y"]).float().mean())
    return model, {"test_accuracy": acc}


# ---------------------------------------------------------------------------- weight files


RECIPES = {"base": "dblend train-base digits", "classifier": "dblend train-base digits",
           "judge": "dblend train-base digits", "expert": "dblend finetune digits"}


def load_weights(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify a digits weight file; errors name the file and its recipe."""
    return load_weight_file(path, RECIPES.get(kind, "the digits recipes"))


def load_base(weights_dir: Path | None = None) -> tuple[UNetDenoiser, dict]:
    """The shipped (or given) base model, frozen, with its metadata."""
    state, meta = load_weights(Path(weights_dir or WEIGHTS_DIR) / "base.safetensors", "base")
    unet = build_unet()
    _load_state(unet, state, Path(weights_dir or WEIGHTS_DIR) / "base.safetensors")
    return UNetDenoiser(unet.eval().requires_grad_(False)), meta


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    """Load weights into ``model``; weights of another shape or layout are a ``UsageError``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise UsageError(f"weight file {path} does not fit the model ({detail[:200]}); "
                         "recreate it with `dblend train-base digits`") from None


def load_classifier(name: str = "classifier", weights_dir: Path | None = None) -> Classifier:
    state, meta = load_weights(Path(weights_dir or WEIGHTS_DIR) / f"{name}.safetensors", name)
    try:
        model = Classifier(int(meta["config"]["width"]))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"weight metadata of {name} in {weights_dir or WEIGHTS_DIR} lacks "
                         "config.width; recreate it with `dblend train-base digits`") from None
    _load_state(model, state, Path(weights_dir or WEIGHTS_DIR) / f"{name}.safetensors")
    return model.eval().requires_grad_(False)


DEFAULT_STEPS = 10


def sample_digits(denoiser: Denoiser, classes: torch.Tensor, seeds: list[int],
                  steps: int = DEFAULT_STEPS, guidance: float = 1.0, progress: bool = False,
                  schedule: Schedule | None = None) -> tuple[torch.Tensor, float]:
    """Images ``[B, 1, 8, 8]`` for per-sample classes and seeds (DDPM, ``steps`` steps)."""
    den = denoiser if guidance == 1.0 else Guided(denoiser, guidance, {"y": None})
    schedule = schedule or BaseConfig().schedule()
    res = sample(den, schedule, seeds, SHAPE, steps, cond={"y": classes}, progress=progress)
    return res.x0, res.nfe_per_sample


# ---------------------------------------------------------------------------- experts by name

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
PAIR = ("ink", "smooth")  # the pair with a two-way conflict: MORL and the demo use it
MORL_GRID = (0.25, 0.5, 0.75)


def morl_name(w1: float, pair: Sequence[str] = PAIR) -> str:
    """The MORL adapter of ``w = (w1, 1 - w1)`` on ``pair`` (adapter names take no ".")."""
    return f"morl_{pair[0]}_{pair[1]}_w{round(w1 * 100):03d}"


def classes_for(seeds: Sequence[int]) -> torch.Tensor:
    """Training prompts: sample with seed s is digit ``s % 10`` (balanced, reproducible)."""
    return torch.tensor([int(s) % 10 for s in seeds], dtype=torch.long)


class FrozenLastStep(nn.Module):
    """An expert whose last step (``t == 0``) is the pretrained model's, as it was trained."""

    def __init__(self, expert: nn.Module, base: nn.Module):
        super().__init__()
        self.expert, self.base = expert, base

    @property
    def nfe(self) -> float:
        return nfe_of(self.expert)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if bool((t.reshape(-1) == 0).all()):
            return self.base(x, t, **cond)
        return self.expert(x, t, **cond)


def normalised_rewards(names: Sequence[str], stats: dict, classifier: nn.Module) -> list:
    """The rewards ``names``, each normalised by its base mean and standard deviation."""
    return [get_reward(n, **reward_options(n, classifier), **stats[n]) for n in names]


def reward_options(name: str, classifier: nn.Module) -> dict:
    """Only the ``class`` rewards read the classifier."""
    return {"classifier": classifier} if name.startswith("class") else {}


def attach_expert(base: nn.Module, base_meta: dict, path: Path) -> tuple[nn.Module, dict]:
    """Load the adapter file ``path`` onto ``base`` (named after the file) as a denoiser."""
    name = Path(path).stem
    state, meta = load_weights(Path(path), "expert")
    if meta.get("base_sha256") != base_meta["sha256"]:
        raise UsageError(f"expert {name!r} was trained on another base (base_sha256 "
                         f"{str(meta.get('base_sha256'))[:12]}... != "
                         f"{base_meta['sha256'][:12]}...); retrain it with "
                         "`dblend finetune digits`")
    if name not in adapter_names(base):   # loaded before (say, an expert that is also MORL's)
        add_lora(base, name, meta["lora"]["rank"], meta["lora"]["targets"])
    load_adapter_state(base, name, state)
    base.requires_grad_(False)
    return FrozenLastStep(AdapterView(base, name), AdapterView(base, None)), meta


# ---------------------------------------------------------------------------- the domain

AMORTISED_ADAPTER = "amortised"
AMORTISED = f"amortised_{PAIR[0]}_{PAIR[1]}"
CONDITIONED = f"conditioned_{PAIR[0]}_{PAIR[1]}"   # the same network trained by RL directly


def load_amortised(weights_dir: Path | None = None, preference: Preference | None = None,
                   path: Path | None = None,
                   allow_extrapolation: bool = False) -> AmortisedDenoiser:
    """The shipped (or ``path``) amortised blend of ``PAIR`` as a denoiser (LoRA merged: one
    model's cost per step); made by ``dblend distill digits``."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    model, base_meta = load_base(weights_dir)
    state, meta = load_weight_file(path or weights_dir / "experts" / f"{AMORTISED}.safetensors",
                                   "dblend distill digits")
    if meta.get("base_sha256") != base_meta["sha256"]:
        raise UsageError(f"{AMORTISED} was distilled on another base; rerun "
                         "`dblend distill digits`")
    add_lora(model, AMORTISED_ADAPTER, meta["lora"]["rank"], meta["lora"]["targets"])
    load_adapter_state(model, AMORTISED_ADAPTER, {k[5:]: v for k, v in state.items()
                                                  if k.startswith("lora.")})
    emb = PrefEmbedding(len(meta["pair"]), model.unet.time_embedding.linear_2.out_features,
                        meta["config"]["hidden"])
    emb.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("pref.")})
    net = merged_copy(model, AMORTISED_ADAPTER)
    return AmortisedDenoiser(net, emb.requires_grad_(False), net.unet.time_embedding,
                             preference or Preference((0.5, 0.5)), meta["config"]["lam_max"],
                             allow_extrapolation)


class DigitsDomain:
    """digits as a ``Domain``: the shipped base with the named LoRA experts on it (the base
    weights held once), each expert's reward normalised by the base's mean and standard
    deviation, the 10-step DDPM chain. Seed ``s`` draws digit ``s % 10`` unless a class is
    given to ``cond``. MORL: the shipped (or ``morl_dir``) adapters of the first two experts,
    or trained there on demand by ``morl_trainer(domain, name, pref) -> directory``."""

    name, differentiable = "digits", True

    def __init__(self, experts: Sequence[str] = PAIR, steps: int | None = None,
                 weights_dir: Path | None = None, morl_dir: Path | None = None,
                 morl_trainer: Callable[[DigitsDomain, str, Preference], Path] | None = None):
        self.weights_dir = Path(weights_dir or WEIGHTS_DIR)
        self.experts_dir = self.weights_dir / "experts"
        self.names, self.reward_names = list(experts), list(experts)
        self.model, self.base_meta = load_base(self.weights_dir)
        self.model.requires_grad_(False)
        self.base = merged_copy(self.model, None)   # the network without LoRA wrappers
        self.metas, self.merged = {}, {}
        self.experts = [self.adapter(n) for n in self.names]
        self.alpha = float(self.metas[self.names[0]]["alpha"])
        self.stats = read_json(self.experts_dir / "rewards.json", "reward statistics")
        self.classifier = load_classifier("classifier", self.weights_dir)
        self.reward_fns = normalised_rewards(self.names, self.stats, self.classifier)
        self.schedule, self.shape = BaseConfig().schedule(), SHAPE
        self.steps = steps or DEFAULT_STEPS
        self.morl_dir, self.morl_trainer = morl_dir, morl_trainer
        self._one_network: dict[str, AmortisedDenoiser] = {}

    def adapter(self, name: str, directory: Path | None = None) -> Denoiser:
        """The adapter ``name`` (an expert, a MORL or lambda-specific fine-tune) as a denoiser:
        merged into its own copy of the small network, so it runs at one plain model's cost."""
        path = (directory or self.experts_dir) / f"{name}.safetensors"
        if not path.exists():
            raise UsageError(f"expert {name!r} is missing ({path}); train it with "
                             "`dblend finetune digits`")
        _, self.metas[name] = attach_expert(self.model, self.base_meta, path)
        self.merged[name] = merged_copy(self.model, name)
        return FrozenLastStep(self.merged[name], self.base)

    def cond(self, seeds: Sequence[int], cls: int | None = None) -> dict:
        if cls is None:
            return {"y": classes_for(seeds)}
        return {"y": torch.full((len(seeds),), check_class(cls), dtype=torch.long)}

    def rewards(self, x0: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        return torch.stack([r(x0, y=y) for r in self.reward_fns], 1)

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def blend(self, pref: Preference) -> Denoiser:
        """The terms on their merged networks (each at a plain model's cost; the K + 1 weight
        sets of this small network take a few MB); the last step stays the pretrained one, as
        the experts were trained."""
        experts = [self.merged[n] for n in self.names]
        return FrozenLastStep(BlendedDenoiser(self.base, experts, pref), self.base)

    def soup(self, coefs: list[float]) -> Denoiser:
        """The experts' LoRA weights summed into one copy of the network (``c = e_i`` is
        expert ``i`` bit for bit)."""
        soup = merged_copy(self.model, soup=list(zip(self.names, coefs, strict=True)))
        return FrozenLastStep(soup, self.base)

    def morl(self, pref: Preference) -> Denoiser | None:
        name = self._morl_name(pref)
        if name is None:
            return None
        for directory in (self.experts_dir, self.morl_dir):
            if directory is not None and (directory / f"{name}.safetensors").exists():
                return self.adapter(name, directory)
        if self.morl_trainer is None or pref.lam != 1.0:
            return None
        return self.adapter(name, self.morl_trainer(self, name, pref))

    def _morl_name(self, pref: Preference) -> str | None:
        if len(self.names) != 2:
            return None
        w1 = pref.w[0]
        if pref.lam == 1.0 and w1 in (0.0, 1.0):
            return self.names[0 if w1 == 1.0 else 1]
        if w1 == 1.0:
            return f"kla_{self.names[0]}_lam{pref.lam:g}".replace(".", "p")
        return morl_name(w1, self.names) if pref.lam == 1.0 else None

    def amortised(self, pref: Preference) -> Denoiser | None:
        """The distilled ``PAIR`` blend (``dblend distill digits``), where it was shipped."""
        return self._one_network_at(AMORTISED, pref)

    def conditioned(self, pref: Preference) -> Denoiser | None:
        """The ``PAIR`` network fine-tuned directly with preferences drawn per trajectory
        (``dblend finetune digits-conditioned``), where it was shipped."""
        return self._one_network_at(CONDITIONED, pref)

    def _one_network_at(self, name: str, pref: Preference) -> Denoiser | None:
        """The preference-conditioned network ``name`` at ``pref``; its last step stays the
        pretrained map, as the experts' (a last step is noise-free: any change there costs a
        large KL, and the blend's last step is the base's)."""
        path = self.experts_dir / f"{name}.safetensors"
        if tuple(self.names) != PAIR or not path.exists():
            return None
        if name not in self._one_network:
            self._one_network[name] = load_amortised(self.weights_dir, pref, path, True)
        self._one_network[name].preference = pref
        return FrozenLastStep(self._one_network[name], self.base)

    def target(self, pref: Preference) -> None:
        return None

    def params(self, parts: list[str]) -> int:
        """One network per part held (the merged copies; the soup is one network, plus the
        base for the last step)."""
        held = {"soup", "base"} if "soup" in parts else set(parts)
        return len(held) * sum(p.numel() for p in self.base.parameters())
