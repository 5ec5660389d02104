"""No network, ever: with every socket connection and name lookup made to fail the test, the sd
commands and every reward loader run on tiny local models, and refuse a missing hub id with a
one-line error (exit 2), without a single connection attempt."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from diffusion_blend.cli import main
from diffusion_blend.errors import UsageError
from diffusion_blend.rewards import get_reward
from tests.rewards.test_hpsv2 import open_clip_layout
from tests.rewards.test_imagereward import VOCAB, original_layout, tiny_parts
from tests.tiny_sd import save_tiny_clip, tiny_sd_pipeline

pytestmark = pytest.mark.slow

MISSING = "no-such-org/no-such-model"


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach another host is recorded and fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts[:3]}"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny pipeline, a LoRA expert for it, a tiny CLIP, ImageReward and HPSv2 checkpoints."""
    from diffusion_blend.finetune.config import preset
    from diffusion_blend.finetune.sd import finetune_sd

    d = tmp_path_factory.mktemp("offline")
    tiny_sd_pipeline(d / "tok").save_pretrained(d / "pipe")
    (d / "prompts.txt").write_text("a red apple\na blue pear\n")
    finetune_sd(d / "pipe", d / "prompts.txt", "jpeg-compressibility",
                preset("sd-dpok", iterations=1, batch_size=2, sample_steps=2,
                       checkpoint_every=1, eval_trajectories=2), d / "expert", guidance=3.0,
                progress=False)
    clip = save_tiny_clip(d / "clip")
    _imagereward(d / "ir")
    _hpsv2(d / "hps", clip)
    return d


def _imagereward(d):
    from transformers import BertTokenizer

    d.mkdir()
    torch.save(original_layout(*tiny_parts()), d / "ImageReward.pt")
    (d / "tok").mkdir()
    (d / "tok" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(d / "tok" / "vocab.txt")).save_pretrained(d / "tok")


def _hpsv2(d, clip_dir):
    from transformers import CLIPModel

    d.mkdir()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    torch.save({"state_dict": open_clip_layout(clip)}, d / "HPS_v2.1_compressed.pt")


def test_sample_sd_local_and_missing(local, no_network, capsys, tmp_path):
    lora = str(local / "expert" / "lora")
    base = ["sample", "sd", "--experts", lora, "--steps", "2", "--guidance", "3"]
    assert main([*base, "--model", str(local / "pipe"), "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main([*base, "--model", MISSING, "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert MISSING in err and err.count("\n") == 1 and not (tmp_path / "b.png").exists()


def test_finetune_sd_local_and_missing(local, no_network, capsys, tmp_path):
    base = ["finetune", "sd", "--prompts", str(local / "prompts.txt"), "--reward",
            "jpeg-compressibility", "--iterations", "1", "--batch-size", "2", "--sample-steps",
            "2", "--guidance", "3"]
    assert main([*base, "--model", str(local / "pipe"), "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--model", MISSING, "--out", str(tmp_path / "b")]) == 2
    assert MISSING in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_sweep_sd_local_and_missing(local, no_network, capsys, tmp_path):
    lora = str(local / "expert" / "lora")
    base = ["sweep", "sd", "--experts", f"{lora},{lora}", "--rewards",
            "jpeg-compressibility,jpeg-incompressibility", "--prompts",
            str(local / "prompts.txt"), "--w-grid", "0,1", "--seeds", "2", "--steps", "2",
            "--methods", "pretrained,db-mpa", "--guidance", "3", "--json"]
    assert main([*base, "--model", str(local / "pipe"), "--out", str(tmp_path / "a")]) == 0
    assert "hypervolume" in json.loads(capsys.readouterr().out)
    assert main([*base, "--model", MISSING, "--out", str(tmp_path / "b")]) == 2
    assert MISSING in capsys.readouterr().err


def _loaders(d):
    clip = d / "clip"
    head = d / "head.pth"
    if not head.exists():
        from diffusion_blend.rewards.images import AestheticHead

        torch.save(AestheticHead(32).state_dict(), head)
    return {
        "clip-score": ({"model": clip}, {"model": MISSING}),
        "pickscore": ({"model": clip, "processor": clip}, {"model": clip, "processor": MISSING}),
        "aesthetic": ({"model": clip, "head": head}, {"model": MISSING, "head": head}),
        "imagereward": ({"model": d / "ir", "tokenizer": d / "ir" / "tok", "vision_heads": 4,
                         "text_heads": 4}, {"model": d / "ir", "tokenizer": MISSING,
                                            "vision_heads": 4, "text_heads": 4}),
        "hpsv2": ({"model": d / "hps", "tokenizer": clip, "vision_heads": 4, "text_heads": 4},
                  {"model": d / "hps", "tokenizer": MISSING, "vision_heads": 4,
                   "text_heads": 4}),
    }


@pytest.mark.parametrize("name", ["clip-score", "pickscore", "aesthetic", "imagereward",
                                  "hpsv2"])
def test_each_reward_loader_local_and_missing(local, no_network, name):
    found, missing = _loaders(local)[name]
    reward = get_reward(name, **found)
    assert reward(torch.rand(1, 3, 16, 16), prompt=["a red apple"]).shape == (1,)
    with pytest.raises(UsageError, match=MISSING):
        get_reward(name, **missing)
