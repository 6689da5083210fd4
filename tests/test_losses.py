"""Each method's loss against a naive, loop-based reference written from the paper's formula."""
import math

import pytest
import torch

import simclr


def naive_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2]).double()
    n = len(z)
    B = n // 2
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    total = 0.0
    for i in range(n):
        j = (i + B) % n
        denom = sum(math.exp(cos(z[i], z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / t) / denom)
    return total / n


@pytest.mark.parametrize("B,d,t", [(4, 8, 0.5), (7, 3, 0.1), (16, 32, 1.0)])
def test_nt_xent_matches_naive_double_loop(B, d, t):
    g = torch.Generator().manual_seed(B)
    z1, z2 = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    assert simclr.loss_fn(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)


def test_nt_xent_prefers_aligned_views():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=g)
    aligned = simclr.loss_fn(z1, z1 + 0.01 * torch.randn(32, 16, generator=g), 0.5)
    shuffled = simclr.loss_fn(z1, z1[torch.randperm(32, generator=g)], 0.5)
    assert aligned < shuffled
    # lower bound: even perfect alignment pays for the 2B-2 negatives at similarity >= -1
    assert aligned > 0


# ---------------------------------------------------------------------------------------------- BYOL
import byol  # noqa: E402
import simsiam  # noqa: E402
import barlow  # noqa: E402


def naive_cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_byol_loss_matches_formula_and_known_values():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    want = sum(2 - 2 * naive_cos(p[i].double(), z[i].double()) for i in range(9)) / 9
    assert byol.loss_fn(p, z).item() == pytest.approx(want, rel=1e-5)
    assert byol.loss_fn(p, 3 * p).item() == pytest.approx(0, abs=1e-6)  # same direction: loss 0
    assert byol.loss_fn(p, -p).item() == pytest.approx(4, abs=1e-5)  # opposite: the maximum, 4


def test_byol_target_gets_no_gradient():
    torch.manual_seed(0)
    online, pred = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)
    target = byol.copy.deepcopy(online).requires_grad_(False)
    x = torch.randn(8, 4)
    with torch.no_grad():
        z_t = target(x)
    byol.loss_fn(pred(online(x)), z_t).backward()
    assert online.weight.grad is not None and online.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


def test_ema_update_and_schedule_follow_their_formulas():
    torch.manual_seed(0)
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.copy_(torch.randn(3))
        online.running_mean.copy_(torch.randn(3))
    before = target.weight.clone()
    byol.ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)
    assert torch.equal(target.running_mean, online.running_mean)  # buffers copied
    assert byol.ema_rate(0, 100, 0.99) == pytest.approx(0.99)
    assert byol.ema_rate(50, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    assert byol.ema_rate(100, 100, 0.99) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- SimSiam
def test_simsiam_loss_matches_formula_and_known_values():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    want = -sum(naive_cos(p[i].double(), z[i].double()) for i in range(6)) / 6
    assert simsiam.loss_fn(p, z).item() == pytest.approx(want, rel=1e-5)
    zn = torch.nn.functional.normalize(z, dim=1)
    assert simsiam.loss_fn(zn, zn).item() == pytest.approx(-1, abs=1e-6)


def test_simsiam_stop_gradient_holds():
    z = torch.randn(5, 4, requires_grad=True)
    p = torch.randn(5, 4, requires_grad=True)
    simsiam.loss_fn(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_simsiam_fixed_predictor_lr():
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=0.1)
    sched = simsiam.common.warmup_cosine(opt, 0, 10, fixed_groups=(1,))
    for _ in range(5):
        opt.step()
        sched.step()
    lr0, lr1 = sched.get_last_lr()
    assert lr0 == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10))) and lr1 == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- Barlow Twins
def naive_barlow(z1, z2, lambd, eps=1e-5):
    z1, z2 = z1.double(), z2.double()
    B, D = z1.shape
    std = lambda z, j: math.sqrt(sum((z[b, j] - z[:, j].mean()) ** 2 for b in range(B)) / B + eps)
    n1 = [[float((z1[b, j] - z1[:, j].mean()) / std(z1, j)) for j in range(D)] for b in range(B)]
    n2 = [[float((z2[b, j] - z2[:, j].mean()) / std(z2, j)) for j in range(D)] for b in range(B)]
    loss = 0.0
    for i in range(D):
        for j in range(D):
            c = sum(n1[b][i] * n2[b][j] for b in range(B)) / B
            loss += (1 - c) ** 2 if i == j else lambd * c ** 2
    return loss


def test_barlow_loss_matches_naive_loops():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    assert barlow.loss_fn(z1, z2, 0.3).item() == pytest.approx(naive_barlow(z1, z2, 0.3), rel=1e-4)


def test_barlow_loss_is_zero_for_identity_cross_correlation():
    # columns of a 4x4 Hadamard matrix without the all-ones one: zero mean, unit variance, mutually orthogonal
    h = torch.tensor([[1., 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]])
    assert barlow.loss_fn(h, h, 5e-3).item() == pytest.approx(0, abs=1e-4)
    assert barlow.loss_fn(h, -h, 5e-3).item() == pytest.approx(3 * 4, rel=1e-3)  # c = -I: each (1 - (-1))^2
