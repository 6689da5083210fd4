"""Metrics, kNN and the linear probe against brute-force definitions and constructed data."""
import itertools
import math

import pytest
import torch

import common
import dataset
import evaluate


def brute_auc(y, s):
    """P(s_pos > s_neg) + 1/2 P(tie) over every positive/negative pair."""
    pos = [a for a, t in zip(s.tolist(), y.tolist()) if t]
    neg = [a for a, t in zip(s.tolist(), y.tolist()) if not t]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_auc_matches_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 2, (60,), generator=g)
        s = torch.randint(0, 8, (60,), generator=g).float()  # many ties
        assert evaluate.binary_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert evaluate.binary_auc(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert evaluate.binary_auc(torch.tensor([1, 1, 0, 0]), torch.tensor([0.1, 0.2, 0.3, 0.4])) == 0.0
    assert evaluate.binary_auc(torch.tensor([1, 1]), torch.tensor([0.1, 0.2])) != evaluate.binary_auc(
        torch.tensor([1, 1]), torch.tensor([0.1, 0.2]))  # NaN when only one class is present


def brute_metrics(y, pred, K):
    y, pred = y.tolist(), pred.tolist()
    n = len(y)
    acc = sum(a == b for a, b in zip(y, pred)) / n
    f1w, recalls = 0.0, []
    for c in range(K):
        tp = sum(1 for a, b in zip(y, pred) if a == c and b == c)
        fp = sum(1 for a, b in zip(y, pred) if a != c and b == c)
        support = sum(1 for a in y if a == c)
        if support == 0:
            continue
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / support
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1w += support / n * f1
        recalls.append(rec)
    return acc, f1w, sum(recalls) / len(recalls)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_metrics_match_brute_force(K):
    g = torch.Generator().manual_seed(K)
    y = torch.randint(0, K, (200,), generator=g)
    probs = torch.rand(200, K, generator=g).softmax(1)
    m = evaluate.metrics(y, probs)
    acc, f1w, bacc = brute_metrics(y, probs.argmax(1), K)
    assert m["acc"] == pytest.approx(acc) and m["f1_weighted"] == pytest.approx(f1w)
    assert m["balanced_acc"] == pytest.approx(bacc)
    if K == 2:
        assert m["auc"] == pytest.approx(brute_auc(y == 1, probs[:, 1]))
    else:  # macro one-vs-rest
        assert m["auc"] == pytest.approx(sum(brute_auc(y == c, probs[:, c]) for c in range(K)) / K)


def test_knn_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    tr, te = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    ytr = torch.randint(0, 3, (50,), generator=g)
    for k in (5, 200):  # 200 > 50: capped at the train size
        probs = evaluate.knn_predict(tr, ytr, te, 3, k=k, temperature=0.1)
        for i in range(7):
            sims = [(float(torch.cosine_similarity(te[i], tr[j], dim=0)), int(ytr[j])) for j in range(50)]
            sims.sort(key=lambda t: -t[0])
            score = [0.0] * 3
            for s, c in sims[:min(k, 50)]:
                score[c] += math.exp(s / 0.1)
            total = sum(score)
            assert probs[i].tolist() == pytest.approx([s / total for s in score], rel=1e-4)


def test_linear_probe_separates_separable_data_and_not_noise():
    g = torch.Generator().manual_seed(2)
    make = lambda n: torch.randn(n, 16, generator=g)
    w = torch.randn(16, generator=g)
    xs = [make(n) for n in (300, 100, 200)]
    ys = [(x @ w > 0).long() for x in xs]
    probs, info, head = evaluate.linear_probe(xs[0], ys[0], xs[1], ys[1], xs[2], 2)
    m = evaluate.metrics(ys[2], probs)
    assert m["acc"] > 0.95 and m["auc"] > 0.99 and info["val_auc"] > 0.99
    # the returned head works on raw features: the standardization is folded into it
    assert torch.allclose(head(xs[2]).softmax(1), probs, atol=1e-5)
    noise = [torch.randint(0, 2, (len(x),), generator=g) for x in xs]
    probs, _, _ = evaluate.linear_probe(xs[0], noise[0], xs[1], noise[1], xs[2], 2)
    assert abs(evaluate.metrics(noise[2], probs)["auc"] - 0.5) < 0.15


def test_linear_probe_l2_is_the_one_best_on_val_not_on_train_or_test():
    """Few train points in many dimensions: train AUC is best with the weakest L2 (it overfits), val and test each
    prefer another strength (test's labels follow a different rule). The probe must take the L2 whose val AUC is
    highest, report that AUC, and give the test probabilities of that fit (planted: L2 chosen by train AUC passed
    every other test, which only checked which arrays linear_probe receives)."""
    g = torch.Generator().manual_seed(4)  # a seed where train, val and test pick 1e-5, 0.1 and 10 (asserted below)
    w, w_test = torch.randn(40, generator=g), torch.randn(40, generator=g)
    xs = [torch.randn(n, 40, generator=g) for n in (30, 200, 200)]
    noisy = lambda x, v: ((x @ v + 2.0 * torch.randn(len(x), generator=g)) > 0).long()
    ys = [noisy(xs[0], w), noisy(xs[1], w), noisy(xs[2], 0.3 * w + w_test)]
    wds = (1e-5, 1e-3, 1e-1, 10.0, 1000.0)
    mu, sd = xs[0].mean(0), xs[0].std(0).clamp(min=1e-6)
    fits = {wd: evaluate.fit_logistic((xs[0] - mu) / sd, ys[0], 2, wd) for wd in wds}  # brute force over the grid
    auc = lambda wd, i: evaluate.metrics(ys[i], (((xs[i] - mu) / sd) @ fits[wd][0] + fits[wd][1]).softmax(1))["auc"]
    best = {i: max(wds, key=lambda wd: auc(wd, i)) for i in range(3)}
    assert len({best[0], best[1], best[2]}) == 3, best  # the data make the three choices disagree
    probs, info, _ = evaluate.linear_probe(xs[0], ys[0], xs[1], ys[1], xs[2], 2, wds=wds)
    assert info["wd"] == best[1] and info["val_auc"] == pytest.approx(auc(best[1], 1), abs=1e-6)
    assert evaluate.metrics(ys[2], probs)["auc"] == pytest.approx(auc(best[1], 2), abs=1e-4)


def test_features_use_eval_mode_batch_independent():
    """In eval mode BN uses running stats, so a sample's features do not depend on its batch."""
    torch.manual_seed(0)
    net, dim = common.make_backbone("resnet18", 1, 28)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    a = evaluate.extract_features(net, images, [0.5], [0.25], batch_size=6)
    b = evaluate.extract_features(net, images, [0.5], [0.25], batch_size=1)
    assert a.shape == (6, dim) and torch.allclose(a, b, atol=1e-4)
    assert net.training  # restored afterwards


def test_backbone_stems():
    small, d18 = common.make_backbone("resnet18", 1, 28)
    assert d18 == 512 and small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    big, d50 = common.make_backbone("resnet50", 3, 224)
    assert d50 == 2048 and big.conv1.stride == (2, 2) and big.conv1.in_channels == 3
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    # the boundary itself: 64 px is still small (3x3/1 stem, no max-pool), 65 px takes ImageNet's 7x7/2 + max-pool
    # (planted: `< 64` gave 64 px images the 7x7/2 stem, shrinking them to 16 px before the first block)
    at64, _ = common.make_backbone("resnet18", 1, 64)
    at65, _ = common.make_backbone("resnet18", 1, 65)
    assert at64.conv1.kernel_size == (3, 3) and at64.conv1.stride == (1, 1)
    assert isinstance(at64.maxpool, torch.nn.Identity)
    assert at65.conv1.kernel_size == (7, 7) and at65.conv1.stride == (2, 2)
    assert isinstance(at65.maxpool, torch.nn.MaxPool2d)
    with pytest.raises(ValueError, match="--arch 'vgg'"):
        common.make_backbone("vgg", 1, 28)


def test_label_subset_is_stratified_seeded_and_keeps_every_class():
    y = torch.tensor([0] * 300 + [1] * 50 + [2] * 3)
    idx = evaluate.label_subset(y, 0.1, seed=0)
    assert torch.bincount(y[idx]).tolist() == [30, 5, 1]  # round(0.1 n_c), at least one per class
    assert torch.equal(idx, evaluate.label_subset(y, 0.1, seed=0))
    assert not torch.equal(idx, evaluate.label_subset(y, 0.1, seed=1))
    assert len(idx.unique()) == len(idx)
    assert torch.bincount(y[evaluate.label_subset(y, 0.01, seed=0)]).tolist() == [3, 1, 1]
    assert torch.equal(evaluate.label_subset(y, 1.0, seed=0), torch.arange(len(y)))
    with pytest.raises(ValueError, match="label fraction 0"):
        evaluate.label_subset(y, 0, seed=0)


def test_finetune_learns_a_visible_class_and_leaves_the_backbone_alone(tmp_path):
    import numpy as np
    from conftest import make_arrays
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(64, 16, 32), seed=4))
    ds = dataset.load("pneumonia", 28, str(tmp_path))
    mean, std = dataset.channel_stats(ds["train"][0])
    torch.manual_seed(0)
    net, dim = common.make_backbone("resnet18", 1, 28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = torch.nn.Linear(dim, 2)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)  # equal scores: val AUC 0.5 at epoch 0
    m = evaluate.finetune(net, head, ds, mean, std, epochs=2, lr=0.2, batch_size=32)
    assert m["auc"] > 0.95 and m["epoch"] >= 1  # the classes differ in brightness: easy once trained
    assert m["epochs"] == 2 and m["val_auc"] > 0.95
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not head.weight.any()  # the caller's head is left alone too


def test_lp_ft_starts_from_the_probe_and_reports_the_best_val_epoch(monkeypatch, tmp_path):
    import numpy as np
    from conftest import make_arrays
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(32, 16, 24), seed=6))
    ds = dataset.load("pneumonia", 28, str(tmp_path))
    mean, std = dataset.channel_stats(ds["train"][0])
    torch.manual_seed(0)
    net, _ = common.make_backbone("resnet18", 1, 28)
    f = {s: evaluate.extract_features(net, ds[s][0], mean, std) for s in dataset.SPLITS}
    probs, info, head = evaluate.linear_probe(f["train"], ds["train"][1], f["val"], ds["val"][1], f["test"], 2)
    # with a zero LR nothing moves: every epoch ties with epoch 0, the probe itself, whose test metrics these are
    m = evaluate.finetune(net, head, ds, mean, std, epochs=2, lr=0.0)
    assert m["epoch"] == 0 and m["val_auc"] == pytest.approx(info["val_auc"], abs=1e-6)
    assert m["auc"] == pytest.approx(evaluate.metrics(ds["test"][1], probs)["auc"], abs=1e-6)
    # the selection: scripted val scores per epoch 0..4 -> the first epoch with the best val AUC, its test metrics
    val_scores, epoch = [0.6, 0.9, 0.7, 0.9, 0.8], {"n": -1}
    yv = ds["val"][1]

    def scripted(net_, head_, ds_, mean_, std_, split):
        if split == "val":
            epoch["n"] += 1  # train_with_labels scores val once per epoch, 0..epochs
        return torch.full((len(ds_[split][1]), 2), float(epoch["n"]))  # the test probs carry the epoch they came from
    monkeypatch.setattr(evaluate, "head_probs", scripted)
    monkeypatch.setattr(evaluate, "metrics", lambda y, p: {"auc": val_scores[epoch["n"]], "balanced_acc": 0.5}
                        if y is yv else {"auc": 1.0, "mark": float(p[0, 0])})
    monkeypatch.setattr(evaluate, "bootstrap_auc", lambda *a, **k: [0.0, 1.0])
    m = evaluate.finetune(net, head, ds, mean, std, epochs=4, lr=0.0)
    assert m["epoch"] == 1 and m["val_auc"] == 0.9 and m["mark"] == 1.0


def test_knn_k_is_chosen_on_val_and_never_a_majority_vote_when_neighbours_disagree():
    # 2-D features: a big class 0 everywhere and a tight small class 1; the 200-NN vote is always class 0
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 2, generator=g) * 3
    small = torch.tensor([4.0, 4.0]) + 0.05 * torch.randn(30, 2, generator=g)
    tr, ytr = torch.cat([big, small]), torch.tensor([0] * 300 + [1] * 30)
    val = torch.cat([torch.randn(60, 2, generator=g) * 3, torch.tensor([4.0, 4.0]) + 0.05 * torch.randn(20, 2, generator=g)])
    yval = torch.tensor([0] * 60 + [1] * 20)
    k, m = evaluate.knn_select(tr, ytr, val, yval, 2)
    # brute force over the candidate ks with the same criterion: (balanced acc, AUC, -k)
    scores = {kk: evaluate.metrics(yval, evaluate.knn_predict(tr, ytr, val, 2, k=kk)) for kk in evaluate.KS}
    assert k == max(scores, key=lambda kk: (scores[kk]["balanced_acc"], scores[kk]["auc"], -kk))
    assert scores[200]["balanced_acc"] < m["balanced_acc"] and k < 200
    assert evaluate.knn_predict(tr, ytr, val, 2, k=k).argmax(1).bool().any()  # not all majority
    k_few, _ = evaluate.knn_select(tr[:4], ytr[:4], val, yval, 2)  # fewer train points than the smallest k
    assert k_few == 4


def test_knn_k_is_the_one_best_on_val_not_on_train_or_test():
    """Overlapping classes where the train points as queries, val and test each prefer another k (10, 100, 5: seed 4,
    asserted): knn_select must return val's (planted: the train features scored as queries picked 10)."""
    g = torch.Generator().manual_seed(4)

    def make(n):
        y = torch.arange(n) % 2
        return torch.randn(n, 4, generator=g) + y[:, None].float(), y
    (tr, ytr), (va, yva), (te, yte) = make(300), make(120), make(120)
    crit = lambda m, k: (m["balanced_acc"], m["auc"], -k)
    best = {}
    for name, (x, y) in (("train", (tr, ytr)), ("val", (va, yva)), ("test", (te, yte))):
        scores = {k: evaluate.metrics(y, evaluate.knn_predict(tr, ytr, x, 2, k=k)) for k in evaluate.KS}
        best[name] = max(evaluate.KS, key=lambda k: crit(scores[k], k))
    assert len(set(best.values())) == 3, best
    k, _ = evaluate.knn_select(tr, ytr, va, yva, 2)
    assert k == best["val"]


def test_bootstrap_interval_matches_the_hanley_mcneil_standard_error():
    g = torch.Generator().manual_seed(0)
    n = 600
    y = (torch.rand(n, generator=g) < 0.4).long()
    score = y.float() + 1.2 * torch.randn(n, generator=g)  # AUC about 0.72
    auc = evaluate.binary_auc(y, score)
    lo, hi = evaluate.bootstrap_auc(y, torch.stack([-score, score], 1).softmax(1), n=1000, seed=0)
    # Hanley & McNeil (1982): SE^2 = (A(1-A) + (n1-1)(Q1-A^2) + (n0-1)(Q2-A^2)) / (n1 n0), Q1 = A/(2-A), Q2 = 2A^2/(1+A)
    n1, n0 = int(y.sum()), int((1 - y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2)) / (n1 * n0))
    assert lo < auc < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_evaluate_args_are_checked_and_fall_back_to_the_checkpoint(capsys):
    """evaluate.py's Args: each bad field one line (planted: common.RULES' size rule, which refuses the 0 that means
    "the checkpoint's"); the empty / 0 / -1 defaults parse as "not given"."""
    import common
    assert common.parse_args(evaluate.Args, []) == evaluate.Args()
    for argv, says in ((["--size", "5"], "--size 5: expected 0 (the checkpoint's) or 8..1024 pixels"),
                       (["--init", "moco"], "--init 'moco': expected random, supervised or imagenet"),
                       (["--arch", "vgg"], "--arch 'vgg': expected resnet18 or resnet50"),
                       (["--out", "x" * 300 + ".json"], "a name in it is 305 bytes long")):
        with pytest.raises(SystemExit) as e:
            common.parse_args(evaluate.Args, argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
