"""The small plumbing pieces: the Args parser, the LR schedule, atomic checkpoints."""
import copy
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
    shares = []
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        (net(x) - 1).pow(2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        by_eta = []  # per weight tensor: did eta set its step (a trust ratio below 1 under clip_lr)?
        for i, (w, g) in enumerate(zip(ref, grads)):  # the papers' rule, one parameter at a time, in float64
            w64, g64 = w.double(), g.double()
            if w.dim() == 1:  # bias or BN parameter: plain momentum SGD, no weight decay
                d = g64
            elif float(w64.norm()) == 0 or float(g64.norm()) == 0:
                d = g64 + wd * w64
                by_eta.append(False)
            else:
                trust = eta * float(w64.norm()) / (float(g64.norm()) + wd * float(w64.norm()))
                if clip_lr:
                    trust = min(trust / lr, 1.0)
                by_eta.append(trust < 1.0 if clip_lr else True)
                d = trust * (g64 + wd * w64)
            bufs[i] = d if step == 0 else mom * bufs[i] + d  # torch's SGD: the first buffer is the step
            ref[i] = (w64 - lr * bufs[i]).float()
        for w, p in zip(ref, net.parameters()):
            assert torch.allclose(w, p.detach(), atol=1e-6, rtol=1e-5)
        shares.append(opt.eta_share.item())
        assert opt.eta_share.item() == pytest.approx(sum(by_eta) / len(by_eta)), (step, by_eta)
    assert not torch.equal(net[2].weight, torch.zeros(3, 4))  # the zero layer did move
    # step 1: no ratio to take (the zero layer, and the first one's gradient, which flows through it, is zero); then
    # η sets one layer's step of two under clip_lr (the other's trust / lr is above 1), unclipped every layer's
    assert shares == ([0.0, 0.5, 0.5] if clip_lr else [0.0, 1.0, 1.0]), shares
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)  # no eta: a share of 0, on the tensor's own dtype and device
    assert common.eta_share(sgd, torch.ones((), dtype=torch.float64)).dtype == torch.float64
    assert common.eta_share(sgd, torch.ones(())).item() == 0.0
    assert common.eta_share(opt, torch.ones((), dtype=torch.float64)).item() == shares[-1]


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


def test_per_view_batchnorm_equals_one_call_per_view():
    """Both views in one call with per_view_batchnorm give what two separate calls give: outputs, gradients and the
    BN running statistics (planted: statistics of the whole batch, i.e. the helper a no-op, failed here)."""
    torch.manual_seed(0)
    a, _ = common.make_backbone("resnet18", 1, 28)
    a.fc = torch.nn.Sequential(torch.nn.Linear(512, 16), torch.nn.BatchNorm1d(16))  # a projector-like BN1d too
    b = copy.deepcopy(a)
    common.per_view_batchnorm(a, 2)
    x1, x2 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28) * 2 + 1  # views with other statistics
    joint = a(torch.cat([x1, x2]))
    separate = torch.cat([b(x1), b(x2)])
    assert torch.allclose(joint, separate, atol=1e-5)
    joint.square().sum().backward()
    separate.square().sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name
    for (name, s), t in zip(a.named_buffers(), b.buffers()):
        assert torch.allclose(s.float(), t.float(), atol=1e-6), name
    # not the whole-batch statistics: a plain network gives other outputs
    c = copy.deepcopy(b)
    assert not torch.allclose(c(torch.cat([x1, x2])), separate, atol=1e-3)
    # eval mode: running statistics, the same either way; and a deep copy (BYOL's target) keeps the split, its own
    a.eval(), b.eval()
    assert torch.allclose(a(torch.cat([x1, x2])), torch.cat([b(x1), b(x2)]), atol=1e-5)
    d = copy.deepcopy(a).train()
    before = [t.clone() for t in a.buffers()]
    d_out = d(torch.cat([x1, x2]))  # updates d's running statistics, not a's
    assert all(torch.equal(t, u) for t, u in zip(a.buffers(), before))
    assert not all(torch.equal(t, u) for t, u in zip(d.buffers(), before))
    assert torch.allclose(d_out, a.train()(torch.cat([x1, x2])), atol=1e-5)
    assert common.RULES["bn"][0]("per-view") and not common.RULES["bn"][0]("ghost")
