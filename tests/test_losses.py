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
