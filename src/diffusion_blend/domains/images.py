"""What the embedded image domains share (digits, fashion): a class-conditional ``UNet2DModel``
on small grey images in [-1, 1], a reward classifier and a held-out judge (small CNNs), LoRA
experts loaded by name onto the one base, and the domain object the methods see.

A domain is an ``ImageSpec`` (its data, network shape, weights directory, expert pair and
rewards) and a subclass of ``ImageDomain`` naming it. Class ``len(classes)`` is the null class
used for classifier-free guidance. The chain's last step stays the pretrained map
(``FrozenLastStep``), as the experts were trained: a noise-free last step makes any change there
cost a large KL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

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
from diffusion_blend.rewards import get_reward
from diffusion_blend.sampling import Schedule, sample

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
AMORTISED_ADAPTER = "amortised"


@dataclass(frozen=True)
class ImageSpec:
    """One embedded image domain: its data, networks, weights and expert recipe."""

    name: str
    classes: tuple[str, ...]
    size: int
    unet: dict                                  # UNet2DModel's config
    load_data: Callable[[], dict]               # train_x/train_y/test_x/test_y, x in [-1, 1]
    data_source: dict                           # what the recipe records about the data
    weights_dir: Path
    pair: tuple[str, str]                       # the conflicting pair: MORL, demo, distillation
    rewards: tuple[str, ...]                    # rewards normalised by the recipe
    finetuned: dict[str, str]                   # expert reward -> fine-tuning preset
    base_config: dict = field(default_factory=dict)        # BaseConfig overrides
    classifier_config: dict = field(default_factory=dict)  # ClassifierConfig overrides
    morl_grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    kla: tuple[float, ...] = (0.5, 2.0)
    alpha: float = 0.5
    steps: int = 10
    spacing: str = "linear"                     # how the sampling chain spaces its steps

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.size, self.size)

    @property
    def null_class(self) -> int:
        return len(self.classes)

    def schedule(self) -> Schedule:
        """The sampling chain's schedule: the base's betas, the domain's spacing."""
        return replace(BaseConfig().schedule(), spacing=self.spacing)

    def recipe(self, kind: str) -> str:
        """The command that makes a weight file of ``kind``."""
        return {"expert": f"dblend finetune {self.name}",
                "amortised": f"dblend distill {self.name}"}.get(
                    kind, f"dblend train-base {self.name}")

    def check_class(self, c: int | str) -> int:
        """A class index (``"3"`` as typed, or its name) or a ``UsageError``."""
        names = [n.lower() for n in self.classes]
        if isinstance(c, str) and c.strip().lower() in names:
            return names.index(c.strip().lower())
        try:
            v = int(c) if isinstance(c, str) else c
        except ValueError:
            v = None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(self.classes):
            raise UsageError(f"--class {c!r} is not allowed; {self.name} classes are "
                             f"0-{len(self.classes) - 1} ({', '.join(self.classes)})")
        return v


# ---------------------------------------------------------------------------- networks


def build_unet(spec: ImageSpec) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**spec.unet)


class UNetDenoiser(nn.Module):
    """``eps(x, t, y)`` from a class-conditional ``UNet2DModel``; ``y=None`` is the null class."""

    def __init__(self, unet: nn.Module, null_class: int = 10):
        super().__init__()
        self.unet, self.null_class = unet, null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        b = x.shape[0]
        y = self.null_class if y is None else y
        y = torch.as_tensor(y, device=x.device).long().reshape(-1).expand(b)
        t = t.reshape(-1).expand(b)
        return self.unet(x, t, class_labels=y).sample


@dataclass
class BaseConfig:
    """Recipe of a base model (``dblend train-base DOMAIN``) and the chain's schedule."""

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
    checkpoint_every: int = 250
    # classifier-free guidance folded into the shipped network (1 and 0 iterations: none): the
    # trained model is the teacher, a copy regresses onto its guided prediction
    guidance: float = 1.0
    guidance_iterations: int = 0
    guidance_lr: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "T", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name}={getattr(self, name)} is not allowed; use >= 1")
        if self.guidance_iterations < 0 or not (self.guidance >= 1 and self.guidance_lr > 0):
            raise UsageError(f"guidance={self.guidance} (>= 1), guidance_iterations="
                             f"{self.guidance_iterations} (>= 0), guidance_lr={self.guidance_lr}"
                             " (> 0): out of range")
        if not (0 <= self.p_uncond < 1 and 0 <= self.ema < 1 and self.lr > 0):
            raise UsageError(f"p_uncond={self.p_uncond}, ema={self.ema} must be in [0, 1) "
                             f"and lr={self.lr} > 0")

    def schedule(self) -> Schedule:
        return Schedule.linear(self.T, self.beta_start, self.beta_end)


class Classifier(nn.Module):
    """A small CNN on ``1 x size x size`` images; ``features`` is its penultimate layer (for the
    Fréchet distance)."""

    def __init__(self, width: int = 32, size: int = 8, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * ((size + 3) // 4) ** 2, 128), nn.SiLU())
        self.head = nn.Linear(128, classes)

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


# ---------------------------------------------------------------------------- weight files


def load_weights(spec: ImageSpec, path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify a weight file of ``spec``; errors name the file and its recipe."""
    return load_weight_file(path, spec.recipe(kind))


def _load_state(spec: ImageSpec, model: nn.Module, state: dict, path: Path) -> None:
    """Load weights into ``model``; weights of another shape or layout are a ``UsageError``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise UsageError(f"weight file {path} does not fit the model ({detail[:200]}); "
                         f"recreate it with `{spec.recipe('base')}`") from None


def load_base(spec: ImageSpec, weights_dir: Path | None = None) -> tuple[UNetDenoiser, dict]:
    """The shipped (or given) base model, frozen, with its metadata."""
    path = Path(weights_dir or spec.weights_dir) / "base.safetensors"
    state, meta = load_weights(spec, path, "base")
    unet = build_unet(spec)
    _load_state(spec, unet, state, path)
    return UNetDenoiser(unet.eval().requires_grad_(False), spec.null_class), meta


def load_classifier(spec: ImageSpec, name: str = "classifier",
                    weights_dir: Path | None = None) -> Classifier:
    """The reward classifier (``classifier``) or the held-out ``judge``, frozen."""
    path = Path(weights_dir or spec.weights_dir) / f"{name}.safetensors"
    state, meta = load_weights(spec, path, name)
    try:
        model = Classifier(int(meta["config"]["width"]), spec.size, len(spec.classes))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"weight metadata of {path} lacks config.width; recreate it with "
                         f"`{spec.recipe(name)}`") from None
    _load_state(spec, model, state, path)
    return model.eval().requires_grad_(False)


def sample_images(spec: ImageSpec, denoiser: Denoiser, classes: torch.Tensor, seeds: list[int],
                  steps: int | None = None, guidance: float = 1.0,
                  progress: bool = False) -> tuple[torch.Tensor, float]:
    """Images ``[B, 1, S, S]`` for per-sample classes and seeds (DDPM, ``steps`` steps)."""
    den = denoiser if guidance == 1.0 else Guided(denoiser, guidance, {"y": None})
    res = sample(den, spec.schedule(), seeds, spec.shape, steps or spec.steps,
                 cond={"y": classes}, progress=progress)
    return res.x0, res.nfe_per_sample


# ---------------------------------------------------------------------------- experts by name


def morl_name(w1: float, pair: Sequence[str]) -> str:
    """The MORL adapter of ``w = (w1, 1 - w1)`` on ``pair`` (adapter names take no ".")."""
    return f"morl_{pair[0]}_{pair[1]}_w{round(w1 * 100):03d}"


def kla_name(expert: str, lam: float) -> str:
    """The fine-tune of ``expert`` at ``alpha / lam`` (DB-KLA's oracle)."""
    return f"kla_{expert}_lam{lam:g}".replace(".", "p")


def classes_for(seeds: Sequence[int], n: int = 10) -> torch.Tensor:
    """Training prompts: sample with seed s is class ``s % n`` (balanced, reproducible)."""
    return torch.tensor([int(s) % n for s in seeds], dtype=torch.long)


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


def reward_options(name: str, classifier: nn.Module) -> dict:
    """Only the ``class`` rewards read the classifier."""
    return {"classifier": classifier} if name.startswith("class") else {}


def normalised_rewards(names: Sequence[str], stats: dict, classifier: nn.Module) -> list:
    """The rewards ``names``, each normalised by its base mean and standard deviation."""
    return [get_reward(n, **reward_options(n, classifier), **stats[n]) for n in names]


def attach_expert(spec: ImageSpec, base: nn.Module, base_meta: dict,
                  path: Path) -> tuple[nn.Module, dict]:
    """Load the adapter file ``path`` onto ``base`` (named after the file) as a denoiser."""
    name = Path(path).stem
    state, meta = load_weights(spec, Path(path), "expert")
    if meta.get("base_sha256") != base_meta["sha256"]:
        raise UsageError(f"expert {name!r} was trained on another base (base_sha256 "
                         f"{str(meta.get('base_sha256'))[:12]}... != "
                         f"{base_meta['sha256'][:12]}...); retrain it with "
                         f"`{spec.recipe('expert')}`")
    if name not in adapter_names(base):   # loaded before (say, an expert that is also MORL's)
        add_lora(base, name, meta["lora"]["rank"], meta["lora"]["targets"])
    load_adapter_state(base, name, state)
    base.requires_grad_(False)
    return FrozenLastStep(AdapterView(base, name), AdapterView(base, None)), meta


def amortised_name(spec: ImageSpec) -> str:
    return f"amortised_{spec.pair[0]}_{spec.pair[1]}"


def conditioned_name(spec: ImageSpec) -> str:
    """The pair's network trained by RL directly with a preference per trajectory."""
    return f"conditioned_{spec.pair[0]}_{spec.pair[1]}"


def load_amortised(spec: ImageSpec, weights_dir: Path | None = None,
                   preference: Preference | None = None, path: Path | None = None,
                   allow_extrapolation: bool = False) -> AmortisedDenoiser:
    """The shipped (or ``path``) amortised blend of the pair as a denoiser (LoRA merged: one
    model's cost per step); made by ``dblend distill DOMAIN``."""
    weights_dir = Path(weights_dir or spec.weights_dir)
    model, base_meta = load_base(spec, weights_dir)
    path = path or weights_dir / "experts" / f"{amortised_name(spec)}.safetensors"
    state, meta = load_weights(spec, path, "amortised")
    if meta.get("base_sha256") != base_meta["sha256"]:
        raise UsageError(f"{path.stem} was distilled on another base; rerun "
                         f"`{spec.recipe('amortised')}`")
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


# ---------------------------------------------------------------------------- the domain


class ImageDomain:
    """An image domain as a ``Domain``: the shipped base with the named LoRA experts on it (the
    base weights held once), each expert's reward normalised by the base's mean and standard
    deviation, the DDPM chain. Seed ``s`` draws class ``s % 10`` unless a class is given to
    ``cond``. MORL: the shipped (or ``morl_dir``) adapters of the first two experts, or trained
    there on demand by ``morl_trainer(domain, name, pref) -> directory``."""

    spec: ImageSpec
    differentiable = True

    def __init__(self, experts: Sequence[str] | None = None, steps: int | None = None,
                 weights_dir: Path | None = None, morl_dir: Path | None = None,
                 morl_trainer: Callable[[ImageDomain, str, Preference], Path] | None = None,
                 spacing: str | None = None):
        if spacing:      # this domain's chain: every use of its spec (sampling, MORL) sees it
            self.spec = replace(self.spec, spacing=spacing)
        spec = self.spec
        self.name = spec.name
        self.weights_dir = Path(weights_dir or spec.weights_dir)
        self.experts_dir = self.weights_dir / "experts"
        self.names = list(experts or spec.pair)
        self.reward_names = list(self.names)
        self.model, self.base_meta = load_base(spec, self.weights_dir)
        self.base = merged_copy(self.model, None)   # the network without LoRA wrappers
        self.metas, self.merged = {}, {}
        self.experts = [self.adapter(n) for n in self.names]
        self.alpha = float(self.metas[self.names[0]]["alpha"])
        self.stats = read_json(self.experts_dir / "rewards.json", "reward statistics")
        self.classifier = load_classifier(spec, "classifier", self.weights_dir)
        self.reward_fns = normalised_rewards(self.names, self.stats, self.classifier)
        self.schedule, self.shape = spec.schedule(), spec.shape
        self.steps = steps or spec.steps
        self.morl_dir, self.morl_trainer = morl_dir, morl_trainer
        self._one_network: dict[str, AmortisedDenoiser] = {}

    def adapter(self, name: str, directory: Path | None = None) -> Denoiser:
        """The adapter ``name`` (an expert, a MORL or lambda-specific fine-tune) as a denoiser:
        merged into its own copy of the small network, so it runs at one plain model's cost."""
        path = (directory or self.experts_dir) / f"{name}.safetensors"
        if not path.exists():
            raise UsageError(f"expert {name!r} is missing ({path}); train it with "
                             f"`{self.spec.recipe('expert')}`")
        _, self.metas[name] = attach_expert(self.spec, self.model, self.base_meta, path)
        self.merged[name] = merged_copy(self.model, name)
        return FrozenLastStep(self.merged[name], self.base)

    def cond(self, seeds: Sequence[int], cls: int | str | None = None) -> dict:
        if cls is None:
            return {"y": classes_for(seeds, len(self.spec.classes))}
        return {"y": torch.full((len(seeds),), self.spec.check_class(cls), dtype=torch.long)}

    def strata(self, seeds: Sequence[int]) -> torch.Tensor:
        return classes_for(seeds, len(self.spec.classes))

    def rewards(self, x0: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        return torch.stack([r(x0, y=y) for r in self.reward_fns], 1)

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def blend(self, pref: Preference) -> Denoiser:
        """The terms on their merged networks (each at a plain model's cost); the last step
        stays the pretrained one, as the experts were trained."""
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
            return kla_name(self.names[0], pref.lam)
        return morl_name(w1, self.names) if pref.lam == 1.0 else None

    def amortised(self, pref: Preference) -> Denoiser | None:
        """The distilled pair blend (``dblend distill DOMAIN``), where it was shipped."""
        return self._one_network_at(amortised_name(self.spec), pref)

    def conditioned(self, pref: Preference) -> Denoiser | None:
        """The pair's network fine-tuned directly with preferences drawn per trajectory
        (``conditioned-rl``), where it was shipped."""
        return self._one_network_at(conditioned_name(self.spec), pref)

    def _one_network_at(self, name: str, pref: Preference) -> Denoiser | None:
        """The preference-conditioned network ``name`` at ``pref``; its last step stays the
        pretrained map, as the experts'."""
        path = self.experts_dir / f"{name}.safetensors"
        if tuple(self.names) != tuple(self.spec.pair) or not path.exists():
            return None
        if name not in self._one_network:
            self._one_network[name] = load_amortised(self.spec, self.weights_dir, pref, path,
                                                     True)
        self._one_network[name].preference = pref
        return FrozenLastStep(self._one_network[name], self.base)

    def target(self, pref: Preference) -> None:
        return None

    def params(self, parts: list[str]) -> int:
        """One network per part held (the merged copies; the soup is one network, plus the
        base for the last step)."""
        held = {"soup", "base"} if "soup" in parts else set(parts)
        return len(held) * sum(p.numel() for p in self.base.parameters())
