"""The small plumbing pieces: the Args parser, the LR schedule, atomic checkpoints."""
import dataclasses
import math
import os

import pytest
import torch

import common


@dataclasses.dataclass
class Demo:
    lr: float = 0.1  # the learning rate
    name: str = "x"  # a name
    steps: int = 3  # how many
    resume: bool = False  # continue


def test_parse_args_types_defaults_bools_and_help(capsys):
    a = common.parse_args(Demo, ["--lr", "0.5", "--steps", "7", "--resume"])
    assert a == Demo(lr=0.5, name="x", steps=7, resume=True)
    assert common.parse_args(Demo, []) == Demo()
    with pytest.raises(SystemExit):
        common.parse_args(Demo, ["--steps", "seven"])  # not an int: argparse refuses
    with pytest.raises(SystemExit):
        common.parse_args(Demo, ["--help"])
    out = capsys.readouterr().out
    assert "the learning rate (default: 0.1)" in out and "--no-resume" in out


def test_warmup_cosine_follows_its_formula():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = common.warmup_cosine(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for k in range(4, 20):
        assert lrs[k] == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 4) / 16)))


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ck" / "checkpoint.pt"
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "gen": torch.Generator().manual_seed(1).get_state()}
    common.save_checkpoint(str(path), state)
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temp file left behind
    back = common.load_checkpoint(str(path))
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable medssl checkpoint"):
        common.load_checkpoint(str(path))
