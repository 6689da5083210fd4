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


# ---------------------------------------------------------------------------------------------- DCL / DCLW
import dclw  # noqa: E402
import vicreg  # noqa: E402


def naive_dcl(z1, z2, t, sigma=None):
    """The DCL(W) paper's formula, one anchor at a time: anchors are every view of every image."""
    views = [z1.double(), z2.double()]
    B = len(z1)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    total = 0.0
    for v in range(2):
        a, b = views[v], views[1 - v]
        pos = [cos(a[i], b[i]) for i in range(B)]
        for i in range(B):
            w = 1.0
            if sigma is not None:  # 2 - exp(s_ii'/sigma) / mean_j exp(s_jj'/sigma), within the anchor's view
                w = 2 - math.exp(pos[i] / sigma) / (sum(math.exp(p / sigma) for p in pos) / B)
            # negatives: every other image, in both views; never i itself, never its positive
            neg = [cos(a[i], a[k]) for k in range(B) if k != i] + [cos(a[i], b[k]) for k in range(B) if k != i]
            total += -w * pos[i] / t + math.log(sum(math.exp(s / t) for s in neg))
    return total / (2 * B)


@pytest.mark.parametrize("B,d,t,sigma", [(4, 8, 0.5, None), (7, 3, 0.1, 0.5), (16, 32, 0.2, 0.5)])
def test_dcl_and_dclw_match_naive_loops(B, d, t, sigma):
    g = torch.Generator().manual_seed(B)
    z1, z2 = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    assert dclw.loss_fn(z1, z2, t, sigma).item() == pytest.approx(naive_dcl(z1, z2, t, sigma), rel=1e-5)


def test_dcl_denominator_excludes_the_positive():
    # B = 2 with orthogonal images: DCL's denominator holds only the other image's two views, so moving the
    # positive changes -s_ii'/t alone; NT-Xent's would change too (it includes exp(s_ii'/t)).
    e = torch.eye(4)
    z1 = torch.stack([e[0], e[1]])
    for c in (0.0, 0.5, 1.0):  # cos(z1_i, z2_i) = c, and z2_i stays orthogonal to the other image
        z2 = torch.stack([c * e[0] + math.sqrt(1 - c * c) * e[2], c * e[1] + math.sqrt(1 - c * c) * e[3]])
        t = 0.5
        # by hand: negatives of anchor 0 are z1_1 (cos 0) and z2_1 (cos 0): log(2 e^0) = log 2
        assert dclw.loss_fn(z1, z2, t).item() == pytest.approx(-c / t + math.log(2), abs=1e-6)
    assert simclr.loss_fn(z1, z2, 0.5).item() == pytest.approx(-1 / 0.5 + math.log(math.exp(1 / 0.5) + 2), abs=1e-6)


def test_dclw_weights_average_to_one_and_favour_hard_positives():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 4, generator=g)
    z2 = z1 + torch.linspace(0, 2, 8)[:, None] * torch.randn(8, 4, generator=g)  # later pairs agree less
    pos = torch.nn.functional.cosine_similarity(z1, z2)
    w = 2 - 8 * torch.softmax(pos / 0.5, 0)  # the paper's weight, as the loss computes it
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[pos.argmin()] > w[pos.argmax()]
    # with identical weights the loss is DCL's: sigma -> infinity makes every w_i = 1
    assert dclw.loss_fn(z1, z2, 0.2, 1e9).item() == pytest.approx(dclw.loss_fn(z1, z2, 0.2).item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------- VICReg
def naive_vicreg(z1, z2, lam, mu, nu, gamma=1.0, eps=1e-4):
    z1, z2 = z1.double().tolist(), z2.double().tolist()
    B, D = len(z1), len(z1[0])
    s = sum((z1[i][j] - z2[i][j]) ** 2 for i in range(B) for j in range(D)) / (B * D)

    def v(z):
        total = 0.0
        for j in range(D):
            m = sum(z[i][j] for i in range(B)) / B
            var = sum((z[i][j] - m) ** 2 for i in range(B)) / (B - 1)
            total += max(0.0, gamma - math.sqrt(var + eps))
        return total / D

    def c(z):
        m = [sum(z[i][j] for i in range(B)) / B for j in range(D)]
        total = 0.0
        for j in range(D):
            for k in range(D):
                if j != k:
                    cov = sum((z[i][j] - m[j]) * (z[i][k] - m[k]) for i in range(B)) / (B - 1)
                    total += cov ** 2
        return total / D
    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))  # the two hinges averaged, as the official code


def official_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg's loss as facebookresearch/vicreg (main_vicreg.py, VICReg.forward) computes it, written out here by
    hand from its formula: repr = mse; std_loss = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2 with
    std = sqrt(var + 1e-4); cov_loss = sum of squared off-diagonal covariances / D, for each view."""
    B, D = x.shape
    repr_loss = ((x - y) ** 2).mean()
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 0.0001), torch.sqrt(y.var(0) + 0.0001)
    std_loss = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    off = ~torch.eye(D, dtype=torch.bool)
    cov_x, cov_y = x.T @ x / (B - 1), y.T @ y / (B - 1)
    cov_loss = cov_x[off].pow(2).sum() / D + cov_y[off].pow(2).sum() / D
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


@pytest.mark.parametrize("B,D,scale", [(8, 4, 0.3), (32, 16, 0.7), (64, 32, 2.0)])
def test_vicreg_loss_and_gradients_match_the_official_formula(B, D, scale):
    """Guards against summing the two variance hinges (mu (v1 + v2)), which the published coefficients were not
    tuned for: that is 1-5% off the official value at these scales and its gradients differ."""
    g = torch.Generator().manual_seed(B)
    z1 = (scale * torch.randn(B, D, generator=g, dtype=torch.float64)).requires_grad_()
    z2 = (scale * torch.randn(B, D, generator=g, dtype=torch.float64) + 0.1 * z1).detach().requires_grad_()
    ours, ref = vicreg.loss_fn(z1, z2, 25, 25, 1), official_vicreg(z1, z2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    g_ours, g_ref = torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("B,D", [(5, 3), (16, 8)])
def test_vicreg_loss_matches_naive_loops(B, D):
    g = torch.Generator().manual_seed(D)
    z1, z2 = 0.7 * torch.randn(B, D, generator=g), 1.3 * torch.randn(B, D, generator=g)
    assert vicreg.loss_fn(z1, z2, 25, 25, 1).item() == pytest.approx(naive_vicreg(z1, z2, 25, 25, 1), rel=1e-5)


def test_vicreg_variance_term_is_zero_exactly_when_every_std_reaches_gamma():
    # mu = 1, lambda = nu = 0 isolates the variance term; columns with std exactly known
    base = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])  # each column: mean 0, var 4/3
    std = math.sqrt(4 / 3 + 1e-4)
    v = lambda z: vicreg.loss_fn(z, z, 0.0, 1.0, 0.0).item()  # (v(z) + v(z)) / 2
    assert v(base / std) == pytest.approx(0.0, abs=1e-6)  # std exactly 1 = gamma: no penalty
    assert v(2 * base) == 0.0  # std > gamma
    half = base.clone()
    half[:, 1] *= 0.5 / std  # second column's std about 0.5: only it pays, (gamma - its std) / D
    var = 4 / 3 * (0.5 / std) ** 2
    assert v(half) == pytest.approx((1 - math.sqrt(var + 1e-4)) / 2, abs=1e-6)
    assert v(torch.zeros(4, 2)) == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)  # collapse: the full penalty
    # covariance: uncorrelated columns give 0, identical columns give 2 cov^2 / D
    assert vicreg.loss_fn(base, base, 0.0, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    same = base[:, :1].repeat(1, 2)
    assert vicreg.loss_fn(same, same, 0.0, 0.0, 1.0).item() == pytest.approx(2 * (2 * (4 / 3) ** 2 / 2), abs=1e-5)
