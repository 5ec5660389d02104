"""The domains a sweep runs on (``evaluation.methods.SweepDomain``): toy2d with its exact
experts and exact MORL oracle, digits with the shipped LoRA experts and MORL adapters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from diffusion_blend.adapters import AdapterView
from diffusion_blend.baselines import LoraSoup, mixture_soup
from diffusion_blend.blend import Denoiser, Preference
from diffusion_blend.domains import digits
from diffusion_blend.domains.toy2d import Toy2dProblem, load_problem
from diffusion_blend.errors import UsageError
from diffusion_blend.offline import hub_offline

log = logging.getLogger(__name__)


class Toy2dSweep:
    """toy2d: exact experts; MORL is the exact denoiser of the tilted target (the oracle a
    fine-tune converges to); the soup interpolates the experts' mixture parameters."""

    name, differentiable = "toy2d", True

    def __init__(self, spec: str | dict = "bimodal", steps: int | None = None):
        self.problem: Toy2dProblem = load_problem(spec)
        self.schedule, self.steps = self.problem.schedule, steps or self.problem.schedule.T
        self.shape = (self.problem.mixture.dim,)
        self.base = self.problem.base_denoiser()
        eye = torch.eye(self.problem.k, dtype=torch.float64).tolist()
        self.tilted = [self.problem.tilted(e)[0] for e in eye]
        self.experts = [self.problem.denoiser(m) for m in self.tilted]
        self.reward_names = [f"r{i + 1}" for i in range(self.problem.k)]
        self.alpha = self.problem.alpha

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        """The samples as shown: these are images (or points) already."""
        return x0

    def cond(self, seeds: list[int]) -> dict:
        return {}

    def rewards(self, x0: torch.Tensor, **_) -> torch.Tensor:
        return self.problem.rewards_of(x0)

    def soup(self, coefs: list[float]) -> Denoiser:
        return self.problem.denoiser(mixture_soup(self.problem.mixture, self.tilted, coefs))

    def morl(self, pref: Preference) -> Denoiser:
        return self.problem.denoiser(self.problem.target(pref)[0])

    def params(self, parts: list[str]) -> int:
        """Mixture parameters (weights, means, covariances) of each distinct model held."""
        k, d = len(self.problem.mixture.weights), self.problem.mixture.dim
        held = 1 if "soup" in parts else len(parts)
        return held * (k + k * d + k * d * d)


class DigitsSweep:
    """digits: the shipped base and the LoRA experts of ``pair``; MORL from the shipped
    adapters (w on the MORL grid, or lambda-specific fine-tunes of ``pair[0]``), or trained
    into ``morl_dir`` by the fine-tuning engine when ``train_morl``."""

    name, differentiable, problem = "digits", True, None

    def __init__(self, pair=None, steps: int | None = None, weights_dir: Path | None = None,
                 morl_dir: Path | None = None, train_morl: bool = False):
        from diffusion_blend.domains.digits import PAIR, normalised_rewards
        from diffusion_blend.evaluation.digits import DEFAULT_STEPS

        self.pair = tuple(pair or PAIR)
        self.weights_dir = Path(weights_dir or digits.WEIGHTS_DIR)
        self.experts_dir = self.weights_dir / "experts"
        self.morl_dir, self.train_morl = morl_dir, train_morl
        self.model, self.base_meta = digits.load_base(self.weights_dir)
        self.base = AdapterView(self.model, None)   # adapters get injected: keep them off
        self.experts = [self._load(n) for n in self.pair]
        self.alpha = float(json.loads((self.experts_dir / f"{self.pair[0]}.json").read_text())
                           ["alpha"])
        stats = json.loads((self.experts_dir / "rewards.json").read_text())
        classifier = digits.load_classifier("classifier", self.weights_dir)
        self.reward_fns = normalised_rewards(self.pair, stats, classifier)
        self.stats = stats
        self.reward_names = list(self.pair)
        self.schedule, self.steps = digits.BaseConfig().schedule(), steps or DEFAULT_STEPS
        self.shape = digits.SHAPE

    def _load(self, name: str, directory: Path | None = None) -> Denoiser:
        path = (directory or self.experts_dir) / f"{name}.safetensors"
        if not path.exists():
            raise UsageError(f"no expert {name!r} at {path}; train it with "
                             "`dblend finetune digits`")
        from diffusion_blend.domains.digits import attach_expert

        return attach_expert(self.model, self.base_meta, path)[0]

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        """The samples as shown: these are images (or points) already."""
        return x0

    def cond(self, seeds: list[int]) -> dict:
        from diffusion_blend.domains.digits import classes_for

        return {"y": classes_for(seeds)}

    def rewards(self, x0: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        return torch.stack([r(x0, y=y) for r in self.reward_fns], 1)

    def soup(self, coefs: list[float]) -> Denoiser:
        from diffusion_blend.domains.digits import FrozenLastStep

        return FrozenLastStep(LoraSoup(self.model, list(self.pair), coefs), self.base)

    def morl(self, pref: Preference) -> Denoiser | None:
        name = self._morl_name(pref)
        if name is None:
            return None
        for directory in (self.experts_dir, self.morl_dir):
            if directory is not None and (directory / f"{name}.safetensors").exists():
                return self._load(name, directory)
        if not self.train_morl or pref.lam != 1.0 or self.morl_dir is None:
            return None
        return self._train_morl(name, pref)

    def _morl_name(self, pref: Preference) -> str | None:
        from diffusion_blend.domains.digits import morl_name

        w1 = pref.w[0]
        if pref.lam == 1.0 and w1 in (0.0, 1.0):
            return self.pair[0 if w1 == 1.0 else 1]
        if w1 == 1.0:
            return f"kla_{self.pair[0]}_lam{pref.lam:g}".replace(".", "p")
        return morl_name(w1, self.pair) if pref.lam == 1.0 else None

    def _train_morl(self, name: str, pref: Preference) -> Denoiser:
        from diffusion_blend.finetune.config import preset
        from diffusion_blend.finetune.digits import ExpertSpec, train_expert

        meta = json.loads((self.experts_dir / f"{self.pair[0]}.json").read_text())
        spec = ExpertSpec(name, list(self.pair), list(pref.w), meta["alpha"], "pathwise")
        log.info("training the MORL adapter %s (about 2 minutes)", name)
        train_expert(self.weights_dir, self.morl_dir, spec,
                     preset("digits-pathwise", alpha=meta["alpha"]), self.stats)
        return self._load(name, self.morl_dir)

    def params(self, parts: list[str]) -> int:
        """Base weights once, plus the LoRA weights of each adapter used."""
        names = {"expert0": self.pair[0], "expert1": self.pair[1]}
        total = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)
        for part in parts:
            if part in names:
                total += sum(p.numel() for n, p in self.model.named_parameters()
                             if f".{names[part]}." in n)
        return total


class SdSweep:
    """sd: a local diffusers pipeline with one LoRA expert per reward, image rewards of the
    decoded latents with each sample's prompt (sample ``s`` gets prompt ``s % P``), classifier-
    free guidance on every model. MORL adapters are given as ``{w[0]: LoRA dir}``."""

    name, problem = "sd", None

    def __init__(self, model, experts, rewards, prompts, steps: int | None = None,
                 guidance: float = 7.5, reward_kwargs: list[dict] | None = None,
                 morl: dict[float, str] | None = None, height=None, width=None,
                 alpha: float = 0.01):
        from diffusion_blend.domains import sd
        from diffusion_blend.rewards import get_reward

        if len(experts) != len(rewards):
            raise UsageError(f"--experts ({len(experts)}) and --rewards ({len(rewards)}) must "
                             "pair up: one expert per reward")
        pipe = sd.load_pipeline(model)
        self.pipe, self.unet, self.guidance, self.alpha = pipe, pipe.unet, guidance, alpha
        self.names = sd.load_experts(pipe, experts)
        self.bank = sd.PromptBank(pipe, prompts)
        self.schedule, self.steps = sd.schedule_of(pipe), steps or 50
        self.shape = sd.latent_shape(pipe, height, width)
        kwargs = reward_kwargs or [{} for _ in rewards]
        self.reward_fns = [sd.LatentReward(pipe.vae, get_reward(r, **kw), prompts)
                           for r, kw in zip(rewards, kwargs, strict=True)]
        self.reward_names, self.differentiable = list(rewards), all(
            r.differentiable for r in self.reward_fns)
        self.base = self._guided(AdapterView(self.unet, None))
        self.experts = [self._guided(AdapterView(self.unet, n)) for n in self.names]
        self.morl_dirs = {float(k): v for k, v in (morl or {}).items()}

    def _guided(self, module) -> Denoiser:
        from diffusion_blend.blend import Guided
        from diffusion_blend.domains.sd import UNetEps

        den = UNetEps(module, self.schedule, self.pipe.scheduler.config.prediction_type)
        return Guided(den, self.guidance, {"encoder_hidden_states": self.bank.uncond})

    def cond(self, seeds: list[int]) -> dict:
        return self.bank(seeds)

    def rewards(self, x0: torch.Tensor, prompt_idx: torch.Tensor | None = None,
                **_) -> torch.Tensor:
        return torch.stack([r(x0, prompt_idx=prompt_idx) for r in self.reward_fns], 1)

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.reward_fns[0].decode(x0)

    def soup(self, coefs: list[float]) -> Denoiser:
        return self._guided(LoraSoup(self.unet, self.names, coefs))

    def morl(self, pref: Preference) -> Denoiser | None:
        if pref.lam == 1.0 and max(pref.w) == 1.0:
            return self.experts[pref.w.index(1.0)]
        path = self.morl_dirs.get(pref.w[0]) if pref.lam == 1.0 else None
        if path is None:
            return None
        name = f"morl{len(self.morl_dirs)}_{round(pref.w[0] * 100):03d}"
        if name not in {n for layer in _lora_layers(self.unet) for n in layer.lora_A}:
            with hub_offline():
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        return self._guided(AdapterView(self.unet, name))

    def params(self, parts: list[str]) -> int:
        total = sum(p.numel() for n, p in self.unet.named_parameters() if "lora_" not in n)
        for part in parts:
            if part.startswith("expert"):
                name = self.names[int(part[len("expert"):])]
                total += sum(p.numel() for n, p in self.unet.named_parameters()
                             if f".{name}." in n)
        return total


def _lora_layers(model):
    from diffusion_blend.adapters import lora_layers

    return lora_layers(model)
