"""Wiring: what the training loops and evaluate() pass between the unit-tested pieces. The loss, LARS, kNN and probe
tests check each function against a reference; the invariant tests (resume = uninterrupted, N ranks = one process)
run the same code on both sides. Neither sees a loop that hands a correct function the wrong tensor. These tests
spy on the calls during real training steps and one real evaluate() and check what each call received: which
tensors (by value, against independent recomputation), with or without gradient, which split, which step count.
Each docstring names the planted bug it was seen to catch (planted, test failed, reverted)."""
import copy
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import dataset
import evaluate
from conftest import ROOT, make_arrays


# ------------------------------------------------------------------------------------------------ method loops
SMALL = {"simclr": dict(proj_hidden=64), "dclw": dict(proj_hidden=64), "byol": dict(proj_hidden=64, proj_dim=32),
         "simsiam": dict(proj_dim=64, pred_hidden=16), "barlow": dict(proj_dim=64),
         "vicreg": dict(proj_dim=64, sim_coeff=24.0, std_coeff=26.0, cov_coeff=1.5)}  # distinct: a swap would show


def spy_run(method, data_dir, out, monkeypatch, steps=2, B=8, epochs=1, **over):
    """`epochs` epochs of `steps` real training steps of `method`.main, in this process, recording: the views the op
    returned, every backbone / projector / predictor call (module, grad mode, input, output), every loss_fn call
    (its arguments as given and its value), every ema_update call and each optimizer step's LR per param group.
    Evaluation is stubbed out (tested below). `over`: Args fields to set (e.g. warmup_epochs, lr)."""
    mod = importlib.import_module(method)
    rec = {"views": [], "calls": [], "loss": [], "ema": [], "lr": []}

    real_optimizer = common.make_optimizer

    def make_optimizer(*a, **k):
        opt = real_optimizer(*a, **k)  # before each step: the LR per group that the step applies
        opt.register_step_pre_hook(lambda o, *_: rec["lr"].append([g["lr"] for g in o.param_groups]))
        return opt
    monkeypatch.setattr(common, "make_optimizer", make_optimizer)

    real_augment = common.augment

    def augment(*a, **k):
        views = real_augment(*a, **k)
        rec["views"].append([v.detach().clone() for v in views])
        return views
    monkeypatch.setattr(common, "augment", augment)

    def hook(role):
        def fn(module, inputs, output):
            rec["calls"].append((role, module, torch.is_grad_enabled(), inputs[0].detach().clone(),
                                 output.detach().clone()))
        return fn
    real_backbone = common.make_backbone

    def make_backbone(*a, **k):
        net, dim = real_backbone(*a, **k)
        net.register_forward_hook(hook("backbone"))  # deep copies (BYOL's target) keep the hook
        return net, dim
    monkeypatch.setattr(common, "make_backbone", make_backbone)
    for role, name in (("projector", "Projector"), ("predictor", "Predictor")):
        if hasattr(mod, name):
            cls = getattr(mod, name)

            class Spied(cls):
                def __init__(self, *a, _role=role, **k):
                    super().__init__(*a, **k)
                    self.register_forward_hook(hook(_role))
            monkeypatch.setattr(mod, name, Spied)

    real_loss = mod.loss_fn

    def loss_fn(*a, **k):
        value = real_loss(*a, **k)
        rec["loss"].append(([x.detach().clone() if torch.is_tensor(x) else x for x in a],
                            [torch.is_tensor(x) and x.requires_grad for x in a], value.item()))
        return value
    monkeypatch.setattr(mod, "loss_fn", loss_fn)
    if hasattr(mod, "ema_update"):
        real_ema = mod.ema_update

        def ema_update(target, online, tau):
            rec["ema"].append((target, online, tau))
            return real_ema(target, online, tau)
        monkeypatch.setattr(mod, "ema_update", ema_update)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: {})
    monkeypatch.setattr(evaluate, "knn_eval", lambda *a, **k: {"acc": 0.0, "auc": 0.0})
    monkeypatch.setattr(evaluate, "print_table", lambda *a, **k: None)
    args = mod.Args(data="pneumonia", data_dir=str(data_dir), epochs=epochs, batch_size=B, train_subset=B * steps,
                    **{"warmup_epochs": 0, "eval_every": 100, "out": str(out), **SMALL[method], **over})
    torch.manual_seed(0)
    mod.main(args)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rec["logged"] = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    return mod, args, rec


def online(rec, role):
    """The calls of `role` made with gradients on (the trained network; BYOL's target runs under no_grad)."""
    return [c for c in rec["calls"] if c[0] == role and c[2]]


@pytest.fixture
def tiny(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(16, 8, 8), seed=3))
    return tmp_path


@pytest.mark.parametrize("method", ["simclr", "dclw", "barlow", "vicreg"])
def test_contrastive_loops_give_the_loss_both_views_projections(method, tiny, tmp_path, monkeypatch):
    """loss_fn(z1, z2, <the method's hyperparameters>) with z1, z2 the two halves of the projector's output on
    torch.cat([x1, x2]), both with gradient; the logged loss is the value the optimizer stepped on (Barlow: times
    scale_loss). Guards against e.g. loss_fn(z1, z1), the views not both reaching the backbone, a detached z, a
    dropped or swapped hyperparameter, a missing scale_loss."""
    mod, args, rec = spy_run(method, tiny, tmp_path / "run", monkeypatch)
    backbone, projector = online(rec, "backbone"), online(rec, "projector")
    extra = {"simclr": ["temperature"], "dclw": ["temperature", "sigma"], "barlow": ["lambd"],
             "vicreg": ["sim_coeff", "std_coeff", "cov_coeff"]}[method]
    extra = [getattr(args, name) for name in extra]
    scale = args.scale_loss if method == "barlow" else 1.0
    assert len(rec["loss"]) == len(projector) == len(backbone) == len(rec["views"]) == len(rec["logged"]) == 2
    for (x1, x2), bb, pr, (a, grad, value), logged in zip(rec["views"], backbone, projector, rec["loss"],
                                                         rec["logged"]):
        B = len(x1)
        assert not torch.equal(x1, x2)  # two different views of each image
        assert torch.equal(bb[3], torch.cat([x1, x2]))  # both views through the backbone, in one call
        assert torch.equal(pr[3], bb[4])  # the projector sees the backbone's output
        assert torch.equal(a[0], pr[4][:B]) and torch.equal(a[1], pr[4][B:]) and grad[:2] == [True, True]
        assert a[2:] == extra
        assert logged == pytest.approx(scale * value, rel=1e-6)


def test_simsiam_loop_pairs_each_prediction_with_the_other_views_projection(tiny, tmp_path, monkeypatch):
    """loss_fn(p1, z2) / 2 + loss_fn(p2, z1) / 2, p the predictor's output on z, z the projector's (with gradient;
    loss_fn stops it, tested in test_losses). Guards against loss_fn(p1, z1) + loss_fn(p2, z2): each view predicting
    itself (planted: this test failed, the suite before it did not)."""
    mod, args, rec = spy_run("simsiam", tiny, tmp_path / "run", monkeypatch)
    projector, predictor = online(rec, "projector"), online(rec, "predictor")
    assert len(rec["loss"]) == 4 and len(projector) == len(predictor) == 2
    for s in range(2):
        B = len(rec["views"][s][0])
        z, p = projector[s][4], predictor[s][4]
        assert torch.equal(predictor[s][3], z)
        (a1, _, v1), (a2, _, v2) = rec["loss"][2 * s], rec["loss"][2 * s + 1]
        assert torch.equal(a1[0], p[:B]) and torch.equal(a1[1], z[B:])  # p1 with z2
        assert torch.equal(a2[0], p[B:]) and torch.equal(a2[1], z[:B])  # p2 with z1
        assert rec["logged"][s] == pytest.approx(v1 / 2 + v2 / 2, rel=1e-6)


def test_byol_loop_regresses_the_target_networks_projection_and_steps_the_ema(tiny, tmp_path, monkeypatch):
    """loss_fn(p1, z2_t) + loss_fn(p2, z1_t): p the online predictor's output (with gradient), z_t the *target*
    network's projection of the same views (no gradient), the other view's; then ema_update(target, online, tau)
    once per step, after the optimizer, with tau = ema_rate(global step, total steps, ema_decay). Guards against the
    online z given as the target (planted: failed here only), a swapped pairing, target and online swapped in
    ema_update, and a wrong step count in the EMA schedule. Two epochs: the EMA rate fed the step within the epoch
    instead of the global step (planted) equals it in a one-epoch run."""
    mod, args, rec = spy_run("byol", tiny, tmp_path / "run", monkeypatch, epochs=2)
    proj, pred = online(rec, "projector"), online(rec, "predictor")
    target_proj = [c for c in rec["calls"] if c[0] == "projector" and not c[2]]
    target_bb = [c for c in rec["calls"] if c[0] == "backbone" and not c[2]]
    assert len(proj) == len(pred) == len(target_proj) == len(target_bb) == len(rec["ema"]) == 4
    assert target_proj[0][1] is not proj[0][1]  # a network of its own
    for s in range(4):
        x1, x2 = rec["views"][s]
        B = len(x1)
        assert torch.equal(target_bb[s][3], torch.cat([x1, x2]))  # the target sees the same views
        zt, p = target_proj[s][4], pred[s][4]
        (a1, g1, v1), (a2, g2, v2) = rec["loss"][2 * s], rec["loss"][2 * s + 1]
        assert torch.equal(a1[0], p[:B]) and torch.equal(a1[1], zt[B:]) and g1 == [True, False]
        assert torch.equal(a2[0], p[B:]) and torch.equal(a2[1], zt[:B]) and g2 == [True, False]
        assert rec["logged"][s] == pytest.approx(v1 + v2, rel=1e-6)
        target, net, tau = rec["ema"][s]
        assert target["projector"] is target_proj[0][1] and net["projector"] is proj[0][1]
        assert tau == mod.ema_rate(s, 4, args.ema_decay)
    # the online projections differ from the target's after the first step: the test can tell them apart
    assert not torch.allclose(proj[1][4], target_proj[1][4])


@pytest.mark.parametrize("method", ["simclr", "dclw", "byol", "simsiam", "barlow", "vicreg"])
def test_every_loop_steps_at_the_scheduled_lr_scaled_by_batch_over_256(method, tiny, tmp_path, monkeypatch):
    """Each optimizer step applies lr x B/256 x the warmup-cosine factor of its global step, written out here:
    (s + 1) / W during the W warmup steps, then 0.5 (1 + cos(pi (s - W) / (T - W))); train/lr in metrics.jsonl is
    the LR after the step (the next step's). SimSiam's predictor (group 1) stays at lr x B/256 throughout, warmup
    included. Planted, each failed here: SimCLR's LR not scaled by B/256; the fixed predictor LR still warmed up;
    the schedule stepped once per epoch."""
    B, steps, epochs, warm = 8, 2, 3, 1  # 6 steps: 2 of warmup, 4 of cosine
    mod, args, rec = spy_run(method, tiny, tmp_path / "run", monkeypatch, steps=steps, B=B, epochs=epochs,
                             warmup_epochs=warm, lr=0.37)
    W, T = warm * steps, epochs * steps
    f = lambda s: (s + 1) / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
    base = 0.37 * B / 256
    assert len(rec["lr"]) == T
    for s, lrs in enumerate(rec["lr"]):
        assert lrs[0] == pytest.approx(base * f(s), rel=1e-9), (s, lrs)
        if method == "simsiam":
            assert args.fix_pred_lr and lrs[1] == pytest.approx(base, rel=1e-9), (s, lrs)
        else:
            assert all(lr == pytest.approx(lrs[0], rel=1e-9) for lr in lrs)
    logged = [r["train/lr"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "train/lr" in r]
    assert logged == pytest.approx([base * f(s + 1) for s in range(T - 1)] + [0.0], abs=1e-12)


# ------------------------------------------------------------------------------------------------ optimizer, ranks
def test_lars_trust_ratio_and_its_clipping_both_act_with_large_gradients():
    """Gradients set by hand, large enough that the trust ratio scales one layer (trust / lr < 1) and is clipped to
    plain SGD on the other (trust / lr > 1), against the rule written out in floats: trust = eta |w| / (|g| + wd |w|),
    clipped as min(trust / lr, 1). Guards against clipping min(trust, 1) without dividing by the LR (planted: the
    existing LARS test, whose gradients are 1e-11 to 1e-4, passed; this one failed)."""
    lr, wd, eta, mom = 0.5, 1e-3, 0.02, 0.9
    big, small = torch.nn.Parameter(torch.full((4, 3), 0.5)), torch.nn.Parameter(torch.full((2, 2), 0.5))
    bias = torch.nn.Parameter(torch.full((3,), 0.5))
    params = (big, small, bias)
    opt = common.LARS(params, lr=lr, momentum=mom, weight_decay=wd, eta=eta)
    grads = [torch.full((4, 3), 10.0), torch.full((2, 2), 1e-3), torch.full((3,), 2.0)]

    def rule(w, g, matrix):
        """The step direction and trust / lr for weights w and gradient g (lists of floats)."""
        if not matrix:  # bias: plain momentum SGD, no weight decay
            return g, None
        wn, gn = sum(x * x for x in w) ** 0.5, sum(x * x for x in g) ** 0.5
        trust_over_lr = eta * wn / (gn + wd * wn) / lr
        return [min(trust_over_lr, 1.0) * (gi + wd * wi) for gi, wi in zip(g, w)], trust_over_lr
    bufs = [None] * 3
    for step in range(2):  # the second step: the momentum buffer carries the first scaled step
        expected = []
        for k, (p, g) in enumerate(zip(params, grads)):
            w = p.detach().flatten().tolist()
            d, trust_over_lr = rule(w, g.flatten().tolist(), p.ndim > 1)
            if step == 0 and k < 2:  # both regimes are exercised: scaled down (big) and clipped to SGD (small)
                assert (trust_over_lr < 0.01) if k == 0 else (trust_over_lr > 10)
            bufs[k] = d if bufs[k] is None else [mom * b + di for b, di in zip(bufs[k], d)]
            expected.append([wi - lr * bi for wi, bi in zip(w, bufs[k])])
            p.grad = g.clone()
        opt.step()
        for p, e in zip(params, expected):
            assert p.detach().flatten().tolist() == pytest.approx(e, rel=1e-6)


AVERAGE_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import common
rank, world, _ = common.init_distributed()
net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2, bias=False))
for i, p in enumerate(net.parameters()):
    p.grad = torch.full_like(p, float(rank * (i + 1)))  # rank r's gradient of parameter i: r (i + 1)
net[1].weight.grad = None  # a parameter without a gradient (e.g. frozen) stays without
common.average_gradients(net)
line = f"rank {rank} {[None if p.grad is None else sorted(set(p.grad.flatten().tolist())) for p in net.parameters()]}\n"
os.write(1, line.encode())  # one write of a short line: atomic on the shared pipe (print() interleaved the ranks)
dist.destroy_process_group()
"""


def test_average_gradients_is_the_mean_over_ranks():
    """Rank r sets every gradient of parameter i to r (i + 1); after average_gradients each rank must hold the mean
    over ranks, (0 + 1) / 2 (i + 1), in every entry. Guards against the all-reduced sum not divided by the world
    size (planted: the two ranks still agree with each other, so the invariant tests passed; this one failed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--no-python", sys.executable, "-c", AVERAGE_SCRIPT, ROOT],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} [[0.5], [1.0], None]" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------------ augmentation
def test_every_sampled_parameter_varies_within_a_batch_and_each_sample_gets_its_own():
    """Each random field of sample_params varies over the B samples of a batch (not one draw broadcast to all), the
    two views differ, and the op applies sample b's params to image b alone: the same image in every row gives
    B different outputs, and rows whose params are equal give equal outputs."""
    from csrc.augment import NAMES
    B = 64
    views = (common.ViewProbs(jitter=0.8, gray=0.2, blur=0.5, solarize=0.2),) * 2
    p = common.sample_params(B, 28, 28, 3, torch.Generator().manual_seed(0), views=views, scale=(0.2, 1.0))
    for v in range(2):
        for i, name in enumerate(NAMES):
            assert p[v, :, i].unique().numel() > 1, f"view {v}: {name} is the same for every sample"
    assert not torch.equal(p[0], p[1])
    img = torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x1, x2 = common.augment(img.expand(B, -1, -1, -1).contiguous(), p, 28, [0.5] * 3, [0.25] * 3)
    flat = x1.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == B  # every sample its own view
    q = p.clone()
    q[:, 1] = q[:, 0]  # rows 0 and 1 now share params: equal outputs, the others untouched
    y1, _ = common.augment(img.expand(B, -1, -1, -1).contiguous(), q, 28, [0.5] * 3, [0.25] * 3)
    assert torch.equal(y1[0], y1[1]) and torch.equal(y1[2:], x1[2:])


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_routes_each_split_to_its_role(tmp_path, monkeypatch):
    """One real evaluate(): kNN's k is chosen on val (train as the memory bank) and the test predictions use that
    k with the train features; every linear probe fits on train rows (all, or the label subset), chooses L2 on val
    and predicts test; reported metrics are on the test labels. Guards against k chosen on the test split
    (planted: failed here only), val and test swapped in the probe, a subset taken from the wrong split."""
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(48, 24, 32), seed=4))
    ds = dataset.load("pneumonia", 28, str(tmp_path))
    mean, std = dataset.channel_stats(ds["train"][0])
    torch.manual_seed(0)
    net, _ = common.make_backbone("resnet18", 1, 28)
    feats, calls = {}, {"select": [], "knn": [], "probe": []}
    real_extract, real_select = evaluate.extract_features, evaluate.knn_select
    real_knn, real_probe = evaluate.knn_predict, evaluate.linear_probe

    def extract(backbone, images, *a, **k):
        f = real_extract(backbone, images, *a, **k)
        split = next(s for s in dataset.SPLITS if images is ds[s][0])
        feats[split] = f
        return f

    def select(train_f, train_y, val_f, val_y, *a, **k):
        out = real_select(train_f, train_y, val_f, val_y, *a, **k)
        calls["select"].append((train_f, train_y, val_f, val_y, out))
        return out

    def knn(train_f, train_y, test_f, *a, **k):
        calls["knn"].append((train_f, train_y, test_f, k.get("k")))
        return real_knn(train_f, train_y, test_f, *a, **k)

    def probe(train_f, train_y, val_f, val_y, test_f, *a, **k):
        calls["probe"].append((train_f, train_y, val_f, val_y, test_f))
        return real_probe(train_f, train_y, val_f, val_y, test_f, *a, **k)
    for name, fn in (("extract_features", extract), ("knn_select", select), ("knn_predict", knn),
                     ("linear_probe", probe)):
        monkeypatch.setattr(evaluate, name, fn)
    out = evaluate.evaluate(net, ds, mean, std, seed=0)
    (train_f, train_y, val_f, val_y, (k, val_metrics)), = calls["select"]
    assert train_f is feats["train"] and val_f is feats["val"]
    assert torch.equal(train_y, ds["train"][1]) and torch.equal(val_y, ds["val"][1])
    assert out["knn"]["k"] == k and out["knn"]["val_auc"] == val_metrics["auc"]
    # the one kNN prediction outside knn_select: test features, train as the bank, the k chosen on val
    test_calls = [c for c in calls["knn"] if c[2] is feats["test"]]
    assert len(test_calls) == 1 and test_calls[0][0] is feats["train"] and test_calls[0][3] == k
    assert all(c[2] is feats["val"] for c in calls["knn"] if c is not test_calls[0])
    assert len(calls["probe"]) == 3  # 100%, 1%, 10% of the train labels
    train_rows = {tuple(r.tolist()) for r in feats["train"]}
    for tf, ty, vf, vy, sf in calls["probe"]:
        assert vf is feats["val"] and torch.equal(vy, ds["val"][1]) and sf is feats["test"]
        assert all(tuple(r.tolist()) in train_rows for r in tf) and len(tf) == len(ty)
    knn_probs = real_knn(feats["train"], ds["train"][1], feats["test"], ds["n_classes"], k=k)
    assert out["knn"]["auc"] == pytest.approx(evaluate.metrics(ds["test"][1], knn_probs)["auc"])


def test_test_predictions_do_not_depend_on_the_other_test_samples():
    """kNN and the linear probe score each test sample on its own: the predictions for the first half of the test
    set are the same whether the second half is present or not (no test-set statistics, no transductive leak)."""
    g = torch.Generator().manual_seed(0)
    train_f, val_f, test_f = (torch.randn(n, 16, generator=g) for n in (60, 30, 40))
    train_y, val_y = torch.arange(60) % 2, torch.arange(30) % 2
    train_f[train_y == 1] += 1.0
    val_f[val_y == 1] += 1.0
    knn_all = evaluate.knn_predict(train_f, train_y, test_f, 2, k=10)
    knn_half = evaluate.knn_predict(train_f, train_y, test_f[:20], 2, k=10)
    torch.testing.assert_close(knn_half, knn_all[:20])
    probe_all = evaluate.linear_probe(train_f, train_y, val_f, val_y, test_f, 2)[0]
    probe_half = evaluate.linear_probe(train_f, train_y, val_f, val_y, test_f[:20], 2)[0]
    torch.testing.assert_close(probe_half, probe_all[:20])


# ------------------------------------------------------------------------------------------------ caches
def test_folder_cache_notices_an_image_rewritten_with_the_same_size(tmp_path):
    """An image overwritten with other pixels and exactly the same file size (an uncompressed BMP) must be decoded
    again, not served from the cache. Guards against a cache key of names and sizes without modification times
    (planted: the cache tests passed; this one failed)."""
    from PIL import Image
    root = tmp_path / "ds"
    for k, c in enumerate(("a", "b")):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16, 16), 40 + 100 * k + i, np.uint8)).save(root / c / f"{i}.bmp")
    first = dataset.load(str(root), 16, str(tmp_path / "cache"))
    target = root / "a" / "0.bmp"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    Image.fromarray(np.full((16, 16), 250, np.uint8)).save(target)  # other pixels, same size
    os.utime(target, ns=(mtime + 10**9, mtime + 10**9))  # a later modification time, as any rewrite has
    assert target.stat().st_size == size
    second = dataset.load(str(root), 16, str(tmp_path / "cache"))
    before = torch.cat([first[s][0] for s in dataset.SPLITS])
    after = torch.cat([second[s][0] for s in dataset.SPLITS])
    assert (before == 250).sum() == 0 and (after == 250).sum() == 16 * 16
