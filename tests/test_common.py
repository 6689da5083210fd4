"""The small plumbing pieces: the Args parser, the LR schedule, atomic checkpoints."""
import dataclasses
import math
import os

import pytest
import torch

import common
import runs


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
    runs.atomic_write(str(path), lambda tmp: torch.save(state, tmp))
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temp file left behind
    back = runs.load_checkpoint(str(path), keys=("epoch", "model"))
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable medssl checkpoint"):
        runs.load_checkpoint(str(path))


@pytest.mark.parametrize("clip_lr", [True, False])
def test_lars_matches_a_naive_per_parameter_formula(clip_lr):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        net[2].weight.zero_()  # a zero weight: no trust ratio to take, a plain step
    ref = [p.detach().clone() for p in net.parameters()]
    bufs = [torch.zeros_like(p) for p in ref]
    lrs, wd, eta, mom = [0.5, 0.3, 0.01], 1e-2, 0.02, 0.9
    opt = common.LARS(net.parameters(), lr=lrs[0], momentum=mom, weight_decay=wd, eta=eta, clip_lr=clip_lr)
    x = torch.randn(8, 5)
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        (net(x) - 1).pow(2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        for i, (w, g) in enumerate(zip(ref, grads)):  # the papers' rule, one parameter at a time, in float64
            w64, g64 = w.double(), g.double()
            if w.dim() == 1:  # bias or BN parameter: plain momentum SGD, no weight decay
                d = g64
            elif float(w64.norm()) == 0 or float(g64.norm()) == 0:
                d = g64 + wd * w64
            else:
                trust = eta * float(w64.norm()) / (float(g64.norm()) + wd * float(w64.norm()))
                if clip_lr:
                    trust = min(trust / lr, 1.0)
                d = trust * (g64 + wd * w64)
            bufs[i] = d if step == 0 else mom * bufs[i] + d  # torch's SGD: the first buffer is the step
            ref[i] = (w64 - lr * bufs[i]).float()
        for w, p in zip(ref, net.parameters()):
            assert torch.allclose(w, p.detach(), atol=1e-6, rtol=1e-5)
    assert not torch.equal(net[2].weight, torch.zeros(3, 4))  # the zero layer did move


def test_augmentation_defaults_by_size_and_overrides():
    views = (common.ViewProbs(blur=1.0), common.ViewProbs(blur=0.1))
    small, large = common.augmentation(28, views), common.augmentation(224, views)
    assert [v.blur for v in small["views"]] == [0.0, 0.0]  # small images: no blur
    assert [v.blur for v in large["views"]] == [1.0, 0.1]  # the method's own probabilities
    assert small["scale"] == (common.AUGMENT["small"]["min_scale"], 1.0)
    s = common.AUGMENT["small"]["jitter"]
    assert small["strength"] == (s, s, s, s / 4)
    # the boundary: 64 px takes the small-image recipe, 65 px the large one (planted: `< 64` passed every other case)
    assert common.augmentation(64, views) == small and common.augmentation(65, views) == large
    forced = common.augmentation(28, views, min_scale=0.5, jitter=0.0, blur=1)
    assert forced["scale"] == (0.5, 1.0) and forced["strength"] == (0, 0, 0, 0)
    assert [v.blur for v in forced["views"]] == [1.0, 0.1]
    g = torch.Generator().manual_seed(0)
    p = common.sample_params(500, 28, 28, 1, g, **forced)  # (V, B, P): every crop at least half the area
    area = p[..., common.HEIGHT] * p[..., common.WIDTH]
    assert (area >= 0.5 * 28 * 28 * 0.9).all() and (p[..., common.BRIGHT] == 1).all()
